//! Stage 1 of a load: `[settings]` (environments and data labels), in at most one file.

use super::parse::{Checker, PolicyFile};
use super::Source;
use crate::engine::{Diagnostic, Location, Settings};

/// What is wrong with a `[settings]` table.
#[derive(Debug, thiserror::Error)]
pub(super) enum SettingsError {
    #[error("[settings] is already defined at {first}; at most one file may hold it")]
    AlreadyDefined { first: Location },
    #[error("{0:?} is listed twice")]
    ListedTwice(String),
    #[error("must list between 1 and 64 values")]
    Count,
}

/// The settings of a set: from the one policy file that holds `[settings]`, else the
/// defaults. Problems are added to `diags`.
pub(super) fn stage(
    pol_files: &[(&Source, Option<&PolicyFile>)],
    diags: &mut Vec<Diagnostic>,
) -> Settings {
    let mut settings = Settings::default();
    let mut settings_at: Option<Location> = None;
    for (src, file) in pol_files {
        let Some(raw) = file.and_then(|f| f.settings.as_ref()) else {
            continue;
        };
        let mut ck = Checker::new(src, diags);
        if let Some(first) = &settings_at {
            let first = first.clone();
            ck.error(
                raw.span().start,
                "settings",
                SettingsError::AlreadyDefined { first },
            );
            continue;
        }
        let settings_start = raw.span().start;
        settings_at = Some(ck.loc(settings_start));
        let raw = raw.get_ref();
        for (list, key, target) in [
            (
                &raw.environments,
                "settings.environments",
                &mut settings.environments,
            ),
            (
                &raw.data_labels,
                "settings.data_labels",
                &mut settings.data_labels,
            ),
        ] {
            let Some(list) = list else { continue };
            let mut vals: Vec<String> = Vec::new();
            for v in list {
                if ck.id(v, key, "value") {
                    if vals.contains(v.get_ref()) {
                        let e = SettingsError::ListedTwice(v.get_ref().clone());
                        ck.error(v.span().start, key, e);
                    }
                    vals.push(v.get_ref().clone());
                }
            }
            if vals.is_empty() || vals.len() > 64 {
                ck.error(
                    list.first().map_or(settings_start, |s| s.span().start),
                    key,
                    SettingsError::Count,
                );
            }
            *target = vals;
        }
    }
    settings
}
