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
            if key == "time" || key == "at" || key.ends_with("_at") {
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
                    .filter(|_| c.get("why").is_none())
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

/// The request an explain trace is about.
pub struct Asked<'a> {
    pub capability: &'a str,
    pub env: &'a str,
    pub label: &'a str,
    pub tenant: &'a str,
}

fn list_of(v: Option<&Value>) -> Option<String> {
    let a = v?.as_array()?;
    Some(format!(
        "[{}]",
        a.iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Add a `why` to each rule and candidate of an explain trace, with the values that failed:
/// "env prod not in [dev, staging]", "blast radius 8 > 5". `rules` and `workers` are the
/// loaded rules and workers as JSON (an empty slice where they are not known, e.g. the
/// daemon's rules: the message then names the request's value only).
pub fn explain_why(explain: &mut Value, asked: &Asked, rules: &[Value], workers: &[Value]) {
    let find = |list: &[Value], id: &str| {
        list.iter()
            .find(|x| x.get("id").and_then(Value::as_str) == Some(id))
            .cloned()
    };
    let mut chosen: Option<Value> = None;
    if let Some(rs) = explain.get_mut("rules").and_then(Value::as_array_mut) {
        for r in rs {
            let id = r
                .get("rule_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let rule = find(rules, &id);
            if r.get("matched").and_then(Value::as_bool) == Some(true) {
                chosen = rule;
                continue;
            }
            let why = match r.get("mismatch").and_then(Value::as_str) {
                Some("env") => match list_of(rule.as_ref().and_then(|x| x.get("envs"))) {
                    Some(l) => format!("env {} not in {l}", asked.env),
                    None => format!("env {} does not match", asked.env),
                },
                Some("data_label") => {
                    let rule = rule.as_ref();
                    if let Some(l) = list_of(rule.and_then(|x| x.get("data_labels"))) {
                        format!("label {} not in {l}", asked.label)
                    } else if let Some(m) = rule
                        .and_then(|x| x.get("max_data_label"))
                        .and_then(Value::as_str)
                    {
                        format!("label {} above max_data_label {m}", asked.label)
                    } else {
                        format!("label {} does not match", asked.label)
                    }
                }
                Some("tenant") => match list_of(rule.as_ref().and_then(|x| x.get("tenants"))) {
                    Some(l) => format!("tenant {} not in {l}", asked.tenant),
                    None => format!("tenant {} does not match", asked.tenant),
                },
                Some(other) => format!("{other} does not match"),
                None => continue,
            };
            r["why"] = Value::String(why);
        }
    }
    let rule_max = chosen
        .as_ref()
        .and_then(|r| r.get("max_blast_radius"))
        .and_then(Value::as_u64);
    if let Some(cs) = explain.get_mut("candidates").and_then(Value::as_array_mut) {
        for c in cs {
            let id = c
                .get("worker_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let w = find(workers, &id);
            let wf = |k: &str| w.as_ref().and_then(|w| w.get(k)).cloned();
            let why = match c.get("skipped").and_then(Value::as_str) {
                Some("disabled") => "disabled (enabled = false)".to_string(),
                Some("capability_not_offered") => {
                    format!("does not offer {}", asked.capability)
                }
                Some("env_not_listed") => match list_of(wf("environments").as_ref()) {
                    Some(l) => format!("env {} not in {l}", asked.env),
                    None => format!("env {} not listed", asked.env),
                },
                Some("label_not_cleared") => match wf("max_data_label") {
                    Some(Value::String(m)) => {
                        format!("label {} above its max_data_label {m}", asked.label)
                    }
                    _ => format!("not cleared for label {}", asked.label),
                },
                Some("missing_control") => format!(
                    "lacks control {}",
                    c.get("detail").and_then(Value::as_str).unwrap_or("?")
                ),
                Some("blast_radius_exceeded") => {
                    match (wf("blast_radius").and_then(|b| b.as_u64()), rule_max) {
                        (Some(b), Some(m)) => format!("blast radius {b} > {m}"),
                        (Some(b), None) => {
                            format!("blast radius {b} > the rule's max_blast_radius")
                        }
                        _ => "blast radius above the rule's max_blast_radius".to_string(),
                    }
                }
                Some("unknown_worker") => "not in the registry".to_string(),
                Some(other) => other.to_string(),
                None => continue,
            };
            c["why"] = Value::String(why);
        }
    }
}
