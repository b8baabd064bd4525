//! `hall schema KIND`: the shipped example files validate against the generated JSON Schemas
//! (with an independent validator, boon), and a typo does not.

use std::path::Path;
use std::process::Command;

fn schema(kind: &str) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_hall"))
        .args(["schema", kind])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

struct Validator {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl Validator {
    fn new(kind: &str) -> Validator {
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        let url = format!("urn:hall:{kind}.schema.json");
        compiler.add_resource(&url, schema(kind)).unwrap();
        let index = compiler.compile(&url, &mut schemas).unwrap();
        Validator { schemas, index }
    }

    fn check(&self, toml_text: &str) -> Result<(), String> {
        let v: serde_json::Value = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        self.schemas
            .validate(&v, self.index)
            .map_err(|e| format!("{e:#}"))
    }
}

fn toml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no files in {}", dir.display());
    v
}

#[test]
fn the_shipped_examples_validate_against_the_generated_schemas() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (kind, files) in [
        ("registry", toml_files(&root.join("registry"))),
        ("policy", toml_files(&root.join("policies"))),
        ("fixture", vec![root.join("tests/fixtures/example.toml")]),
    ] {
        let v = Validator::new(kind);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            if let Err(e) = v.check(&text) {
                panic!(
                    "{} does not validate against `hall schema {kind}`:\n{e}",
                    f.display()
                );
            }
        }
    }
}

#[test]
fn the_schemas_reject_what_the_loader_rejects() {
    let policy = Validator::new("policy");
    let bad_key = "[[rule]]\nid = \"r\"\ntenant = [\"org.acme\"]\neffect = \"allow\"\n";
    assert!(policy.check(bad_key).is_err(), "unknown key `tenant`");
    let bad_effect = "[[rule]]\nid = \"r\"\neffect = \"permit\"\n";
    assert!(policy.check(bad_effect).is_err(), "unknown effect");
    let no_effect = "[[rule]]\nid = \"r\"\n";
    assert!(policy.check(no_effect).is_err(), "effect is required");
    let registry = Validator::new("registry");
    let radius = "[[worker]]\nid = \"w\"\ncapabilities = []\nenvironments = []\nmax_data_label = \"PUBLIC\"\nblast_radius = 11\n";
    assert!(registry.check(radius).is_err(), "blast_radius above 10");
    let bad_id = "[[capability]]\nid = \"-x\"\n";
    assert!(
        registry.check(bad_id).is_err(),
        "an id may not start with -"
    );
    let fixture = Validator::new("fixture");
    let no_request = "[[case]]\nname = \"x\"\nexpect = { allowed = true }\n";
    assert!(fixture.check(no_request).is_err(), "request is required");
}
