//! "Did you mean" for mistyped names: capability, worker, env, label, scope, config key.

/// The closest of `candidates` to `input`, if one is close enough to be a likely typo.
///
/// Damerau-Levenshtein (a swapped pair of letters counts as one edit) from `strsim`, the
/// crate clap and cargo use for the same job; a candidate qualifies within a third of the
/// length of what differs after the shared prefix (at least 1 edit). Case differences alone
/// always qualify.
pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = input.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        if c == input {
            return None;
        }
        let d = if c.to_ascii_lowercase() == lower {
            0
        } else {
            strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase())
        };
        // Measured against what differs after the shared prefix: ids share long prefixes
        // (`cap.`, `worker.doc.`), which would make unrelated short names look close.
        let common = lower
            .chars()
            .zip(c.to_ascii_lowercase().chars())
            .take_while(|(a, b)| a == b)
            .count();
        let rest = (input.chars().count().max(c.chars().count())) - common;
        let limit = rest.div_ceil(3).max(1);
        // Ties go to the smaller name, so the answer does not depend on the input order.
        if d <= limit && best.is_none_or(|(bd, bc)| d < bd || (d == bd && c < bc)) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// ` (did you mean "x"?)`, or nothing.
pub fn hint<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(input, candidates)
        .map(|c| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_names_are_suggested_far_ones_are_not() {
        let caps = ["cap.doc.summarize", "cap.doc.translate", "cap.code.review"];
        assert_eq!(
            did_you_mean("cap.doc.summarise", caps),
            Some("cap.doc.summarize")
        );
        assert_eq!(did_you_mean("cap.video.render", caps), None);
        assert_eq!(did_you_mean("tenant", ["tenants", "envs"]), Some("tenants"));
        assert_eq!(
            did_you_mean("prdo", ["dev", "staging", "prod"]),
            Some("prod")
        );
        assert_eq!(
            did_you_mean("PUBLIC", ["PUBLIC"]),
            None,
            "exact: nothing to suggest"
        );
        assert_eq!(did_you_mean("public", ["PUBLIC", "SECRET"]), Some("PUBLIC"));
        assert_eq!(did_you_mean("x", ["dev"]), None);
        assert_eq!(did_you_mean("cap.zz", ["cap.a", "cap.b"]), None);
        assert_eq!(
            did_you_mean(
                "worker.doc.sumarize",
                ["worker.doc.summarize", "worker.doc.local"]
            ),
            Some("worker.doc.summarize")
        );
        assert_eq!(
            did_you_mean("lisen", ["listen", "state_dir"]),
            Some("listen")
        );
        assert_eq!(
            did_you_mean("capabilty", ["capability", "worker"]),
            Some("capability")
        );
        assert_eq!(did_you_mean("rout", ["route", "audit"]), Some("route"));
    }
}
