//! Output for a person at a terminal: no nulls, local times, tables for lists. Scripts get
//! JSON instead (`--json`, or any stdout that is not a terminal).

use serde_json::Value;

/// Epoch milliseconds as local time, `2026-11-29 23:41:07 +01:00`.
pub fn local_time_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes into the tm we own; a null return means no answer.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return ms.to_string();
    }
    let off = tm.tm_gmtoff / 60;
    let sign = if off < 0 { '-' } else { '+' };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        off.abs() / 60,
        off.abs() % 60
    )
}

/// An RFC 3339 time as local time; anything else unchanged.
fn local_time_str(s: &str) -> Option<String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(local_time_ms((t.unix_timestamp_nanos() / 1_000_000) as i64))
}

/// A scalar for a table or a `key: value` line; times shown local.
fn scalar(key: &str, v: &Value) -> String {
    match v {
        Value::String(s) => {
            if key == "time" || key.ends_with("_at") {
                local_time_str(s).unwrap_or_else(|| s.clone())
            } else {
                s.clone()
            }
        }
        Value::Number(n) if key.ends_with("_ms") || key.ends_with("_at") => n
            .as_i64()
            .filter(|ms| *ms > 1_000_000_000_000)
            .map(local_time_ms)
            .unwrap_or_else(|| n.to_string()),
        Value::Array(a) => a
            .iter()
            .map(|x| scalar(key, x))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn label(key: &str) -> String {
    key.strip_suffix("_ms").unwrap_or(key).replace('_', " ")
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
        _ => false,
    }
}

/// `key: value` lines, nested objects indented, nulls and empty lists left out.
pub fn object(v: &Value) {
    let mut out = String::new();
    write_object(v, 0, &mut out);
    print!("{out}");
}

fn write_object(v: &Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    match v {
        Value::Object(o) => {
            let width = o
                .iter()
                .filter(|(_, x)| !is_empty(x) && !x.is_object())
                .map(|(k, _)| label(k).len())
                .max()
                .unwrap_or(0);
            for (k, x) in o {
                if is_empty(x) || k == "ts_ms" && o.contains_key("time") {
                    continue;
                }
                match x {
                    Value::Object(_) => {
                        out.push_str(&format!("{pad}{}:\n", label(k)));
                        write_object(x, depth + 1, out);
                    }
                    Value::Array(a) if a.iter().any(Value::is_object) => {
                        out.push_str(&format!("{pad}{}:\n", label(k)));
                        for item in a {
                            write_object(item, depth + 1, out);
                            out.push_str(&format!("{pad}  --\n"));
                        }
                    }
                    _ => out.push_str(&format!("{pad}{:width$}  {}\n", label(k), scalar(k, x))),
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar("", other))),
    }
}

/// A table of the objects under `key` (`{"tokens": [...]}`), columns in first-seen order,
/// columns that are empty in every row left out.
pub fn list(v: &Value, key: &str) {
    let rows = v
        .get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if rows.is_empty() {
        println!("no {key}");
        return;
    }
    table(&rows, &[]);
}

/// Print rows as an aligned table; `skip` columns left out.
fn table(rows: &[Value], skip: &[&str]) {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        if let Some(o) = r.as_object() {
            for (k, x) in o {
                if !skip.contains(&k.as_str())
                    && !x.is_object()
                    && !cols.contains(k)
                    && rows.iter().any(|r| r.get(k).is_some_and(|x| !is_empty(x)))
                {
                    cols.push(k.clone());
                }
            }
        }
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| r.get(c).map(|x| scalar(c, x)).unwrap_or_default())
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([label(c).len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        let mut s = String::new();
        for (i, v) in vals.iter().enumerate() {
            if i + 1 == vals.len() {
                s.push_str(v);
            } else {
                s.push_str(&format!("{v:w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(cols.iter().map(|c| label(c).to_uppercase()).collect());
    for row in cells {
        line(row);
    }
}

/// Audit records, one a line: time, seq, kind, then what happened.
pub fn records(records: &[Value]) {
    for r in records {
        let g = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
        let time = r
            .get("ts_ms")
            .and_then(Value::as_i64)
            .map(local_time_ms)
            .unwrap_or_default();
        let seq = r.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let mut s = format!("{time}  #{seq:<6} {:<14}", g("kind"));
        match r.get("allowed").and_then(Value::as_bool) {
            Some(true) if g("kind") == "decision" => s.push_str(" allowed"),
            Some(false) if g("kind") == "decision" => s.push_str(" denied "),
            _ => {}
        }
        for k in ["tenant_id", "capability_id", "env", "data_label"] {
            if !g(k).is_empty() {
                s.push(' ');
                s.push_str(g(k));
            }
        }
        if !g("worker_id").is_empty() {
            s.push_str(&format!(" -> {}", g("worker_id")));
        }
        if !g("deny_reason").is_empty() {
            s.push_str(&format!(" ({})", g("deny_reason")));
        }
        if !g("rule_id").is_empty() {
            s.push_str(&format!(" rule {}", g("rule_id")));
        }
        if r.get("dry_run").and_then(Value::as_bool) == Some(true) {
            s.push_str(" [dry run]");
        }
        if !g("detail").is_empty() {
            s.push_str(&format!(" {}", g("detail")));
        }
        println!("{}", s.trim_end());
    }
}

/// A decision: the outcome on the first line, then the ids, then the explain trace.
pub fn decision(v: &Value) {
    let g = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    if v.get("allowed").and_then(Value::as_bool) == Some(true) {
        println!(
            "allowed  worker {}  (rule {})",
            g("worker_id"),
            g("rule_id")
        );
    } else {
        let rule = if g("rule_id").is_empty() {
            String::new()
        } else {
            format!("  (rule {})", g("rule_id"))
        };
        println!("denied   {}{rule}", g("deny_reason"));
    }
    for k in [
        "approval_id",
        "approval_expires_at",
        "decision_id",
        "policy_version",
    ] {
        if !g(k).is_empty() {
            println!(
                "{:<9}{}",
                label(k).split(' ').next().unwrap_or(k),
                scalar(k, &v[k])
            );
        }
    }
    if v.get("dry_run").and_then(Value::as_bool) == Some(true) {
        println!("dry run  (not a real decision)");
    }
    if let Some(hint) = v.get("hint").and_then(Value::as_str) {
        println!("hint     {hint}");
    }
    if let Some(x) = v.get("explain") {
        println!("explain:");
        for r in x
            .get("rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = r.get("rule_id").and_then(Value::as_str).unwrap_or("?");
            match (
                r.get("matched").and_then(Value::as_bool),
                r.get("why").and_then(Value::as_str),
                r.get("mismatch").and_then(Value::as_str),
            ) {
                (Some(true), _, _) => println!("  rule {id}: matched"),
                (_, Some(why), _) => println!("  rule {id}: skipped, {why}"),
                (_, None, Some(m)) => println!("  rule {id}: skipped, {m} does not match"),
                _ => println!("  rule {id}: skipped"),
            }
        }
        for c in x
            .get("candidates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = c.get("worker_id").and_then(Value::as_str).unwrap_or("?");
            if c.get("eligible").and_then(Value::as_bool) == Some(true) {
                println!("  worker {id}: eligible");
            } else {
                let why = c
                    .get("why")
                    .and_then(Value::as_str)
                    .or_else(|| c.get("skipped").and_then(Value::as_str))
                    .unwrap_or("not eligible");
                let detail = c
                    .get("detail")
                    .and_then(Value::as_str)
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                println!("  worker {id}: skipped, {why}{detail}");
            }
        }
        if x.get("rules")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            println!("  no rule names this capability");
        }
    }
}

/// `hall audit verify`: one line.
pub fn verify(v: &Value) {
    if v.get("ok") == Some(&Value::Bool(true)) {
        println!(
            "ok: {} records, hash chain intact, head {}",
            v.get("entries").and_then(Value::as_u64).unwrap_or(0),
            v.get("head").and_then(Value::as_str).unwrap_or("")
        );
    } else {
        println!(
            "BROKEN at record {}: {}",
            v.get("first_bad_seq").and_then(Value::as_u64).unwrap_or(0),
            v.get("problem").and_then(Value::as_str).unwrap_or("")
        );
    }
}
