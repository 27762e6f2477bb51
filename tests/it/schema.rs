//! The policy file's JSON Schema: the committed `policies/bff-policy.schema.json` is what the
//! real `bff schema` prints, every example policy names it and passes a real validator
//! (check-jsonschema, installed by `make test-deps`), and the validator refuses what the loader
//! refuses: an unknown key, a value of the wrong type, a duration without a unit. Where the
//! loader reads a scalar as text, the schema must not flag it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::check::{bff_check, edit, run, BASE};
use crate::support::write_policy;

/// The version `make test-deps` installs, and the venv it installs it into.
const CHECK_JSONSCHEMA_VERSION: &str = "0.39.0";

const SCHEMA_LINE: &str = "# yaml-language-server: $schema=./bff-policy.schema.json";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn committed_schema() -> PathBuf {
    repo().join("policies/bff-policy.schema.json")
}

/// check-jsonschema from the venv `make test-deps` fills (or `BFF_SCHEMA_VENV`), else from PATH.
fn validator() -> Command {
    let venv = std::env::var_os("BFF_SCHEMA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(format!(
                ".cache/bff/check-jsonschema-{CHECK_JSONSCHEMA_VERSION}"
            ))
        });
    let in_venv = venv.join("bin/check-jsonschema");
    let program = if in_venv.is_file() {
        in_venv
    } else {
        PathBuf::from("check-jsonschema")
    };
    let found = Command::new(&program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "check-jsonschema is not installed: run `make test-deps` (python3 -m venv {venv} && \
         {venv}/bin/pip install check-jsonschema=={CHECK_JSONSCHEMA_VERSION})",
        venv = venv.display()
    );
    let mut cmd = Command::new(program);
    cmd.arg("--schemafile").arg(committed_schema());
    cmd
}

/// `(exit code, stdout and stderr)` of the validator on `files`.
fn validate(files: &[&Path]) -> (i32, String) {
    let mut cmd = validator();
    cmd.args(files);
    let (code, stdout, stderr) = run(cmd);
    (code, format!("{stdout}{stderr}"))
}

fn example_policies() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo().join("policies"))
        .expect("read policies/")
        .map(|entry| entry.expect("list policies/").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "the example policies are gone: {files:?}");
    files
}

#[test]
fn the_committed_schema_is_what_bff_schema_prints() {
    let output = Command::new(env!("CARGO_BIN_EXE_bff"))
        .arg("schema")
        .output()
        .expect("run bff schema");
    assert!(output.status.success(), "bff schema failed: {output:?}");
    let printed = String::from_utf8(output.stdout).expect("bff schema prints UTF-8");
    let committed = fs::read_to_string(committed_schema()).unwrap_or_default();
    assert!(
        printed == committed,
        "policies/bff-policy.schema.json is not what `bff schema` prints (the policy types \
         changed): run `bff schema > policies/bff-policy.schema.json`"
    );
}

#[test]
fn every_example_policy_names_the_schema_and_passes_it() {
    let files = example_policies();
    for file in &files {
        let text = fs::read_to_string(file).expect("read example policy");
        assert_eq!(
            text.lines().next(),
            Some(SCHEMA_LINE),
            "{} must start with the schema line, for editors",
            file.display()
        );
    }
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (code, output) = validate(&paths);
    assert_eq!(code, 0, "{output}");
}

/// The test's base policy is valid for both the loader and the schema, so each variant below
/// fails for its one change.
#[test]
fn the_check_tests_base_policy_passes_the_schema() {
    let policy = write_policy(BASE);
    let (code, output) = validate(&[policy.path()]);
    assert_eq!(code, 0, "{output}");
}

/// Fails the loader and the schema alike; the validator names `expect` in its message.
fn assert_refused_by_both(yaml: &str, expect: &str) {
    let policy = write_policy(yaml);
    let mut check = bff_check();
    check.arg(policy.path());
    let (check_code, _, check_err) = run(check);
    assert_eq!(check_code, 1, "the loader accepted it: {check_err}");
    let (code, output) = validate(&[policy.path()]);
    assert_eq!(code, 1, "the schema accepted it:\n{yaml}\n{output}");
    assert!(output.contains(expect), "{output}");
}

#[test]
fn an_unknown_key_fails_the_schema() {
    // A typo of `timeout` on upstream `users` (line 9).
    let yaml = edit(BASE, 9, "timeout: 300ms", "timout: 300ms");
    assert_refused_by_both(&yaml, "'timout' was unexpected");
}

#[test]
fn a_value_of_the_wrong_type_fails_the_schema() {
    // `version` (line 17) is a number; `fields` (line 25) a list.
    let yaml = edit(BASE, 17, "version: 3", "version: three");
    assert_refused_by_both(&yaml, "'three' is not of type 'integer'");
    let yaml = edit(
        BASE,
        25,
        "fields: [userId, displayName]",
        "fields: { userId: 1 }",
    );
    assert_refused_by_both(&yaml, "is not of type 'array'");
}

#[test]
fn a_duration_without_a_unit_fails_the_schema() {
    let yaml = edit(BASE, 18, "deadline: 800ms", "deadline: 800");
    assert_refused_by_both(&yaml, "800 is not of type 'string'");
    let yaml = edit(BASE, 18, "deadline: 800ms", "deadline: 10M");
    assert_refused_by_both(&yaml, "'10M' does not match");
}

/// serde-saphyr reads `X-Version: 2` as the header value "2": the schema must not flag it.
#[test]
fn a_scalar_the_loader_reads_as_text_passes_the_schema() {
    let yaml = edit(
        BASE,
        9,
        "timeout: 300ms",
        "timeout: 300ms, headers: { X-Api-Version: 2, X-Beta: true }",
    );
    let policy = write_policy(&yaml);
    let mut check = bff_check();
    check.arg(policy.path());
    let (check_code, _, check_err) = run(check);
    assert_eq!(check_code, 0, "the loader refused it: {check_err}");
    let (code, output) = validate(&[policy.path()]);
    assert_eq!(code, 0, "{output}");
}
