//! The reloader's incremental reuse: a reload parses only the files that changed since the
//! last set that loaded, and takes the rest from that set, checking again only what depends
//! on the other files. Anything doubtful asks for a full parse ([`NeedsFullParse`]), so a
//! reload's outcome is exactly that of a fresh load.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::parse::{parse_files, Parsed, PolicyFile, RegistryFile};
use super::read::read_dir_sources;
use super::registry::Registry;
use super::{assemble, fingerprint_of, full_load, LoadError, Source};
use crate::engine::{Capability, Diagnostic, Location, Rule, Settings, Snapshot, Worker};

/// Loads that reuse, for each policy file unchanged since the last set that loaded, the
/// rules that set got from it, so a reload parses only the files that changed.
///
/// Parsing is most of a load (TOML: ~2/3 of the CPU time for 10,000 rules) and an edit
/// usually touches one file of many. A file is "unchanged" when its name and a blake3 hash
/// of its bytes match: the name is part of every rule's location, and the hash (not mtime)
/// means any byte change is a miss. A rule depends only on its file's bytes; what depends on
/// the other files (duplicate ids, known environments, labels and workers) is checked again
/// on every load, and if anything is wrong the load is redone from a full parse, so errors
/// and warnings are exactly those of a fresh load. Files holding `[settings]`
/// are always parsed (they are small). Nothing is kept but the last set itself (shared with
/// whoever uses it) and, per file, ranges of its entries: caching the parsed TOML
/// instead held ~20 MB for 10,000 rules.
#[derive(Default)]
pub struct Reloader {
    last: Option<LastGood>,
    parsed: usize,
    /// [`fingerprint`] of the files the last `load_dirs` read (whether they loaded or not).
    fingerprint: Option<blake3::Hash>,
}

/// The last set that loaded, and what each of its reusable files contributed.
struct LastGood {
    snapshot: Arc<Snapshot>,
    registry: HashMap<FileKey, RegistryShare>,
    files: HashMap<FileKey, FileRules>,
}

/// A registry file's share of a set that loaded: ranges of the snapshot's capabilities and
/// workers, and where each was defined (for lint and for duplicate-id messages).
#[derive(Clone, Default)]
pub(super) struct RegistryShare {
    pub(super) capabilities: std::ops::Range<usize>,
    pub(super) cap_locations: Vec<Location>,
    pub(super) workers: std::ops::Range<usize>,
    pub(super) worker_locations: Vec<Location>,
}

/// What each file contributed to a set, for the next load to reuse (`None`: not reusable).
#[derive(Default)]
pub(super) struct Shares {
    pub(super) registry: Vec<Option<RegistryShare>>,
    pub(super) policies: Vec<Option<FileRules>>,
}

/// A registry file as validation sees it.
pub(super) enum RegistryInput<'a> {
    /// Parsed for this load.
    Parsed(&'a Parsed<RegistryFile>),
    /// Unchanged since the last set that loaded: what it gave then.
    Reused(&'a [Capability], &'a [Worker], &'a RegistryShare),
}

impl<'a> RegistryInput<'a> {
    /// The file as parsed for this load (`None`: reused, or it did not parse).
    pub(super) fn parsed(&self) -> Option<&'a RegistryFile> {
        match self {
            RegistryInput::Parsed((f, _)) => f.as_ref(),
            RegistryInput::Reused(..) => None,
        }
    }
}

/// A policy file's share of a set that loaded: its rules (a range of the snapshot's rules)
/// and the warnings its validation gave (lint warnings are recomputed on every load).
#[derive(Clone)]
pub(super) struct FileRules {
    pub(super) rules: std::ops::Range<usize>,
    pub(super) warnings: Vec<Diagnostic>,
}

/// A reuse key: file name and a blake3 hash of its contents.
pub(super) type FileKey = (String, blake3::Hash);

/// A set loaded by a [`Reloader`], shared with it (it reuses the set's rules next time).
#[derive(Debug)]
pub struct Reloaded {
    pub snapshot: Arc<Snapshot>,
    pub warnings: Vec<Diagnostic>,
}

impl Reloader {
    /// How many files the last load parsed (the others were reused).
    pub fn files_parsed(&self) -> usize {
        self.parsed
    }

    /// The [`fingerprint`] of what the last [`load_dirs`](Self::load_dirs) read.
    pub fn fingerprint(&self) -> Option<blake3::Hash> {
        self.fingerprint
    }

    /// How many files the next load can reuse if they are unchanged.
    pub fn reusable_files(&self) -> usize {
        self.last
            .as_ref()
            .map_or(0, |l| l.registry.len() + l.files.len())
    }

    /// Read every `*.toml` in both directories (lexical order) and load them.
    pub fn load_dirs(
        &mut self,
        registry_dir: &Path,
        policies_dir: &Path,
    ) -> Result<Reloaded, LoadError> {
        let t = Instant::now();
        let mut diags = Vec::new();
        let registry = read_dir_sources(registry_dir, &mut diags);
        let policies = read_dir_sources(policies_dir, &mut diags);
        self.fingerprint = Some(fingerprint_of(&registry, &policies, &diags));
        if !diags.is_empty() {
            return Err(LoadError { diagnostics: diags });
        }
        tracing::debug!(
            read_us = t.elapsed().as_micros() as u64,
            "policy files read"
        );
        self.load_sources(&registry, &policies)
    }

    /// Load from in-memory sources: registry files then policy files, each in the order given.
    pub fn load_sources(
        &mut self,
        registry: &[Source],
        policies: &[Source],
    ) -> Result<Reloaded, LoadError> {
        let t = Instant::now();
        let key = |s: &Source| (s.name.clone(), blake3::hash(s.text.as_bytes()));
        let reg_keys: Vec<FileKey> = registry.iter().map(key).collect();
        let keys: Vec<FileKey> = policies.iter().map(key).collect();
        let reg_reuse: Vec<Option<RegistryInput>> = reg_keys
            .iter()
            .map(|k| {
                let last = self.last.as_ref()?;
                let f = last.registry.get(k)?;
                let caps = last.snapshot.capabilities.get(f.capabilities.clone())?;
                let workers = last.snapshot.workers.get(f.workers.clone())?;
                Some(RegistryInput::Reused(caps, workers, f))
            })
            .collect();
        let reg_stale = not_reused(registry, &reg_reuse);
        let reuse: Vec<Option<(&[Rule], &FileRules)>> = keys
            .iter()
            .map(|k| {
                let last = self.last.as_ref()?;
                let f = last.files.get(k)?;
                Some((last.snapshot.rules.get(f.rules.clone())?, f))
            })
            .collect();
        let stale = not_reused(policies, &reuse);
        let mut parsed = reg_stale.len() + stale.len();
        let reg_fresh = parse_files::<RegistryFile>(&reg_stale);
        let mut reg_fresh_iter = reg_fresh.iter();
        let reg_inputs: Vec<RegistryInput> = reg_reuse
            .into_iter()
            .map(|r| match r {
                Some(r) => r,
                None => reg_fresh_iter.next().map_or(
                    RegistryInput::Reused(&[], &[], &EMPTY_SHARE),
                    RegistryInput::Parsed,
                ),
            })
            .collect();
        let fresh = parse_files::<PolicyFile>(&stale);
        let mut fresh_iter = fresh.iter();
        let inputs: Vec<PolicyInput> = reuse
            .iter()
            .map(|r| match r {
                Some((rules, f)) => PolicyInput::Reused(rules, &f.warnings),
                None => fresh_iter
                    .next()
                    .map_or(PolicyInput::Reused(&[], &[]), PolicyInput::Parsed),
            })
            .collect();
        let parse_us = t.elapsed().as_micros() as u64;
        let (result, shares) = match assemble(registry, &reg_inputs, policies, &inputs) {
            Ok(done) => done,
            Err(NeedsFullParse) => {
                parsed = registry.len() + policies.len();
                full_load(registry, policies)
            }
        };
        drop((inputs, reg_inputs));
        self.parsed = parsed;
        tracing::debug!(
            files = registry.len() + policies.len(),
            parsed,
            parse_us,
            total_us = t.elapsed().as_micros() as u64,
            "policy set assembled"
        );
        let loaded = result?;
        let snapshot = Arc::new(loaded.snapshot);
        self.last = Some(LastGood {
            snapshot: snapshot.clone(),
            registry: reg_keys
                .into_iter()
                .zip(shares.registry)
                .filter_map(|(k, f)| Some((k, f?)))
                .collect(),
            files: keys
                .into_iter()
                .zip(shares.policies)
                .filter_map(|(k, f)| Some((k, f?)))
                .collect(),
        });
        Ok(Reloaded {
            snapshot,
            warnings: loaded.warnings,
        })
    }
}

/// Stands in for a missing parse result (never expected: one result per file parsed).
static EMPTY_SHARE: RegistryShare = RegistryShare {
    capabilities: 0..0,
    cap_locations: Vec::new(),
    workers: 0..0,
    worker_locations: Vec::new(),
};

/// A policy file as validation sees it.
pub(super) enum PolicyInput<'a> {
    /// Parsed for this load.
    Parsed(&'a Parsed<PolicyFile>),
    /// Unchanged since the last set that loaded: the rules and warnings it gave then.
    Reused(&'a [Rule], &'a [Diagnostic]),
}

impl<'a> PolicyInput<'a> {
    /// The file as parsed for this load (`None`: reused, or it did not parse).
    pub(super) fn parsed(&self) -> Option<&'a PolicyFile> {
        match self {
            PolicyInput::Parsed((f, _)) => f.as_ref(),
            PolicyInput::Reused(..) => None,
        }
    }
}

/// A load with reused files found an error: redo it from a full parse, so that the
/// diagnostics are exactly those of a fresh load.
pub(super) struct NeedsFullParse;

/// The sources with nothing to reuse (`None` at their index): the ones to parse.
fn not_reused<'a, T>(sources: &'a [Source], reuse: &[Option<T>]) -> Vec<&'a Source> {
    sources
        .iter()
        .zip(reuse)
        .filter(|(_, r)| r.is_none())
        .map(|(s, _)| s)
        .collect()
}

/// Take a reused registry file's capabilities. Their ids were checked when they loaded; only
/// a duplicate in another file is new.
pub(super) fn capabilities(
    caps: &[Capability],
    was: &RegistryShare,
    reg: &mut Registry,
) -> Result<(), NeedsFullParse> {
    for (c, at) in caps.iter().zip(&was.cap_locations) {
        if reg.cap_seen.contains_key(&c.id) {
            return Err(NeedsFullParse);
        }
        reg.cap_seen.insert(c.id.clone(), at.clone());
        reg.cap_locations.push(at.clone());
        reg.capabilities.push(c.clone());
    }
    Ok(())
}

/// Take a reused registry file's workers, checking again what depends on the other files
/// (a duplicate id, the capabilities, environments and label they name), as the registry
/// stage does for a parsed file.
pub(super) fn workers(
    ws: &[Worker],
    was: &RegistryShare,
    settings: &Settings,
    reg: &mut Registry,
) -> Result<(), NeedsFullParse> {
    for (w, at) in ws.iter().zip(&was.worker_locations) {
        if reg.worker_seen.contains_key(&w.id)
            || !w.capabilities.iter().all(|c| reg.cap_seen.contains_key(c))
            || !w
                .environments
                .iter()
                .all(|e| settings.environments.contains(e))
            || !settings.data_labels.contains(&w.max_data_label)
        {
            return Err(NeedsFullParse);
        }
        reg.worker_seen.insert(w.id.clone(), at.clone());
        reg.workers.push(w.clone());
    }
    Ok(())
}

/// Take a reused policy file's rules. Everything about them that depends only on their file
/// was checked when they loaded; check what depends on the other files (a duplicate id, the
/// environments, labels and workers they name), as the rules stage does for a parsed file.
pub(super) fn rules<'a>(
    reused: &'a [Rule],
    settings: &Settings,
    reg: &Registry,
    rule_seen: &mut HashMap<&'a str, usize>,
    rules: &mut Vec<Rule>,
) -> Result<(), NeedsFullParse> {
    let known =
        |list: &Option<Vec<String>>, set: &[String]| list.iter().flatten().all(|v| set.contains(v));
    for r in reused {
        if rule_seen.contains_key(r.id.as_str())
            || !known(&r.envs, &settings.environments)
            || !known(&r.data_labels, &settings.data_labels)
            || !r
                .max_data_label
                .iter()
                .all(|m| settings.data_labels.contains(m))
            || !r
                .workers
                .iter()
                .flatten()
                .all(|w| reg.worker_seen.contains_key(w))
        {
            return Err(NeedsFullParse);
        }
        rule_seen.insert(&r.id, rules.len());
        rules.push(r.clone());
    }
    Ok(())
}
