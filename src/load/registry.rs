//! Stage 2 of a load: the registry (capabilities, then workers), in file order.

use std::collections::HashMap;

use super::parse::{strings, Checker, Key, RegistryFile};
use super::reuse::{self, NeedsFullParse, RegistryInput, RegistryShare};
use super::Source;
use crate::engine::{Capability, Diagnostic, Location, Settings, Worker};

/// What is wrong with a capability or a worker.
#[derive(Debug, thiserror::Error)]
pub(super) enum RegistryError {
    #[error("duplicate capability id (first defined at {first})")]
    DuplicateCapability { first: Location },
    #[error("duplicate worker id (first defined at {first})")]
    DuplicateWorker { first: Location },
    #[error("unknown capability {id:?}: no [[capability]] has this id{hint}")]
    UnknownCapability { id: String, hint: String },
    #[error("blast_radius must be between 0 and 10, got {0}")]
    BlastRadius(i64),
}

/// The registry of a set, and what later stages look ids up in.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) capabilities: Vec<Capability>,
    /// Where each of `capabilities` is defined (for lint).
    pub(super) cap_locations: Vec<Location>,
    pub(super) cap_seen: HashMap<String, Location>,
    pub(super) workers: Vec<Worker>,
    pub(super) worker_seen: HashMap<String, Location>,
    /// Each registry file's share (`shares[i]` is `reg_in[i]`'s), for the next load to reuse.
    pub(super) shares: Vec<RegistryShare>,
}

/// Validate the registry files (`reg_in[i]` is `reg_files[i]`, parsed or reused): every
/// capability first, then every worker, each in file order. Problems are added to `diags`.
pub(super) fn stage(
    reg_in: &[RegistryInput],
    reg_files: &[(&Source, Option<&RegistryFile>)],
    settings: &Settings,
    diags: &mut Vec<Diagnostic>,
) -> Result<Registry, NeedsFullParse> {
    let mut reg = Registry::default();
    let mut shares: Vec<RegistryShare> = vec![RegistryShare::default(); reg_files.len()];
    for ((input, (src, file)), share) in reg_in.iter().zip(reg_files).zip(&mut shares) {
        let first = reg.capabilities.len();
        if let RegistryInput::Reused(caps, _, was) = input {
            reuse::capabilities(caps, was, &mut reg)?;
            share.capabilities = first..reg.capabilities.len();
            share.cap_locations = was.cap_locations.clone();
            continue;
        }
        let Some(file) = file else { continue };
        capabilities(&mut Checker::new(src, diags), file, &mut reg);
        share.capabilities = first..reg.capabilities.len();
        share.cap_locations = reg.cap_locations[first..].to_vec();
    }
    for ((input, (src, file)), share) in reg_in.iter().zip(reg_files).zip(&mut shares) {
        let first = reg.workers.len();
        if let RegistryInput::Reused(_, ws, was) = input {
            reuse::workers(ws, was, settings, &mut reg)?;
            share.workers = first..reg.workers.len();
            share.worker_locations = was.worker_locations.clone();
            continue;
        }
        let Some(file) = file else { continue };
        let mut ck = Checker::new(src, diags);
        workers(&mut ck, file, settings, &mut reg, share);
        share.workers = first..reg.workers.len();
    }
    reg.shares = shares;
    Ok(reg)
}

/// One parsed file's capabilities.
fn capabilities(ck: &mut Checker<'_>, file: &RegistryFile, reg: &mut Registry) {
    for c in &file.capability {
        let key = Key::new("capability", c.id.get_ref());
        if !ck.id(&c.id, key.at(".id"), "capability id") {
            continue;
        }
        let here = ck.loc(c.id.span().start);
        if let Some(first) = reg.cap_seen.get(c.id.get_ref()) {
            let first = first.clone();
            ck.error(
                c.id.span().start,
                key.at(".id"),
                RegistryError::DuplicateCapability { first },
            );
            continue;
        }
        reg.cap_seen.insert(c.id.get_ref().clone(), here.clone());
        reg.cap_locations.push(here);
        reg.capabilities.push(Capability {
            id: c.id.get_ref().clone(),
            description: c.description.clone(),
            owner: c.owner.clone(),
            contact: c.contact.clone(),
        });
    }
}

/// One parsed file's workers (their capabilities must be defined by now).
fn workers(
    ck: &mut Checker<'_>,
    file: &RegistryFile,
    settings: &Settings,
    reg: &mut Registry,
    share: &mut RegistryShare,
) {
    for w in &file.worker {
        let key = Key::new("worker", w.id.get_ref());
        if !ck.id(&w.id, key.at(".id"), "worker id") {
            continue;
        }
        if let Some(first) = reg.worker_seen.get(w.id.get_ref()) {
            let first = first.clone();
            ck.error(
                w.id.span().start,
                key.at(".id"),
                RegistryError::DuplicateWorker { first },
            );
            continue;
        }
        reg.worker_seen
            .insert(w.id.get_ref().clone(), ck.loc(w.id.span().start));
        for c in &w.capabilities {
            if !reg.cap_seen.contains_key(c.get_ref()) {
                let e = RegistryError::UnknownCapability {
                    id: c.get_ref().clone(),
                    hint: crate::suggest::hint(
                        c.get_ref(),
                        reg.cap_seen.keys().map(String::as_str),
                    ),
                };
                ck.error(c.span().start, key.at(".capabilities"), e);
            }
        }
        for e in &w.environments {
            ck.member(
                e,
                &settings.environments,
                key.at(".environments"),
                "environment",
            );
        }
        ck.member(
            &w.max_data_label,
            &settings.data_labels,
            key.at(".max_data_label"),
            "data label",
        );
        for c in &w.controls {
            ck.id(c, key.at(".controls"), "control");
        }
        for s in &w.secrets {
            ck.id(s, key.at(".secrets"), "secret name");
        }
        let br = *w.blast_radius.get_ref();
        if !(0..=10).contains(&br) {
            ck.error(
                w.blast_radius.span().start,
                key.at(".blast_radius"),
                RegistryError::BlastRadius(br),
            );
        }
        reg.workers.push(Worker {
            id: w.id.get_ref().clone(),
            capabilities: strings(&w.capabilities),
            environments: strings(&w.environments),
            max_data_label: w.max_data_label.get_ref().clone(),
            controls: strings(&w.controls),
            blast_radius: br.clamp(0, 10) as u8,
            secrets: strings(&w.secrets),
            enabled: w.enabled.unwrap_or(true),
            description: w.description.clone(),
            owner: w.owner.clone(),
            contact: w.contact.clone(),
            compiled: Default::default(),
        });
        share.worker_locations.push(ck.loc(w.id.span().start));
    }
}
