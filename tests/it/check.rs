//! `bff check FILE…`: every rule the policy loader enforces, run through the real binary on
//! policy files in temp dirs. Each failing case starts from the valid `BASE` and changes one
//! thing, then asserts the exact `file:LINE:COL:` of the one diagnostic and a phrase of its
//! message. Hostile inputs must fail with a located message, never a crash.

use std::{
    fs,
    io::{Read, Seek},
    ops::RangeInclusive,
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::support::write_policy;

/// Far above what a check takes; only here so a hang fails the test instead of the suite.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A small valid policy touching every section. The trailing comments are line numbers; an
/// `insert` shifts the lines below it.
pub(crate) const BASE: &str = r#"client: web                                              # 1
auth:                                                    # 2
  jwt:                                                   # 3
    issuer: https://id.example.com/                      # 4
    audience: web-app                                    # 5
    algorithms: [RS256]                                  # 6
    jwks_url: http://127.0.0.1:9100/jwks.json            # 7
upstreams:                                               # 8
  users: { url: http://127.0.0.1:9101, timeout: 300ms }  # 9
  orders:                                                # 10
    url: http://127.0.0.1:9102                           # 11
    timeout: 250ms                                       # 12
routes:                                                  # 13
  - name: profile                                        # 14
    method: GET                                          # 15
    path: /web/v1/users/{id}                             # 16
    version: 3                                           # 17
    deadline: 800ms                                      # 18
    cache: { scope: user, ttl: 60s, jitter: 5s }         # 19
    fetch:                                               # 20
      user:                                              # 21
        upstream: users                                  # 22
        path: /users/{path.id}                           # 23
        critical: true                                   # 24
        fields: [userId, displayName]                    # 25
      orders:                                            # 26
        upstream: orders                                 # 27
        path: /users/{jwt.sub}/orders?limit={query.n}    # 28
        select: orders                                   # 29
        fields: [orderId, status]                        # 30
        fallback: []                                     # 31
  - name: order                                          # 32
    method: GET                                          # 33
    path: /web/v1/orders/{id}                            # 34
    proxy:                                               # 35
      upstream: orders                                   # 36
      path: /orders/{path.id}                            # 37
      fields: [orderId, "items[].title"]                 # 38
fallthrough: users                                       # 39
"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `yaml` with `from`, which must occur exactly once on line `line` (1-based), replaced by
/// `to` (which may hold newlines).
pub(crate) fn edit(yaml: &str, line: usize, from: &str, to: &str) -> String {
    let mut lines: Vec<String> = yaml.lines().map(str::to_string).collect();
    let target = &mut lines[line - 1];
    assert_eq!(
        target.matches(from).count(),
        1,
        "`{from}` must occur once on line {line}"
    );
    *target = target.replacen(from, to, 1);
    lines.join("\n") + "\n"
}

/// `yaml` with `text` (one or more lines) inserted after line `after` (1-based).
pub(crate) fn insert(yaml: &str, after: usize, text: &str) -> String {
    let mut lines: Vec<&str> = yaml.lines().collect();
    assert!(after <= lines.len());
    lines.splice(after..after, text.lines());
    lines.join("\n") + "\n"
}

/// `yaml` without the given lines (1-based, inclusive).
fn remove(yaml: &str, range: RangeInclusive<usize>) -> String {
    yaml.lines()
        .enumerate()
        .filter(|(i, _)| !range.contains(&(i + 1)))
        .map(|(_, line)| format!("{line}\n"))
        .collect()
}

fn numbered(yaml: &str) -> String {
    yaml.lines()
        .enumerate()
        .map(|(i, line)| format!("{:>4} | {line}\n", i + 1))
        .collect()
}

pub(crate) fn bff_check() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bff"));
    cmd.arg("check");
    cmd
}

/// Runs `cmd` to completion and returns `(exit code, stdout, stderr)`. Fails the test when the
/// process dies by a signal (a panic with `panic = "abort"`, a stack overflow) or hangs.
pub(crate) fn run(mut cmd: Command) -> (i32, String, String) {
    let mut out = tempfile::tempfile().expect("temp file for stdout");
    let mut err = tempfile::tempfile().expect("temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    let mut child = cmd.spawn().expect("spawn bff check");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bff check") {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`bff check` did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |file: &mut fs::File| {
        let mut bytes = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut bytes).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let (stdout, stderr) = (read(&mut out), read(&mut err));
    if let Some(signal) = status.signal() {
        panic!("`bff check` was killed by signal {signal}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
    let code = status.code().expect("an exit code when there is no signal");
    (code, stdout, stderr)
}

fn check_files(files: &[&Path]) -> (i32, String, String) {
    let mut cmd = bff_check();
    cmd.args(files);
    run(cmd)
}

/// How [`check`] names the policy file in its output.
const POLICY: &str = "<policy>";

/// Writes `yaml` to a temp policy file and checks it: `(exit code, stdout, stderr)`, with the
/// file's path written as [`POLICY`].
fn check(yaml: &str) -> (i32, String, String) {
    let policy = write_policy(yaml);
    let (code, stdout, stderr) = check_files(&[policy.path()]);
    let path = policy.path().display().to_string();
    (
        code,
        stdout.replace(&path, POLICY),
        stderr.replace(&path, POLICY),
    )
}

/// One `file:line:col: message` line.
#[derive(Debug)]
struct Diag {
    line: u64,
    col: u64,
    message: String,
}

/// Parses stderr, insisting every line is a diagnostic for `file`.
fn diagnostics(file: &Path, stderr: &str) -> Vec<Diag> {
    let prefix = format!("{}:", file.display());
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let parsed = l.strip_prefix(&prefix).and_then(|rest| {
                let mut parts = rest.splitn(3, ':');
                let line = parts.next()?.parse().ok()?;
                let col = parts.next()?.parse().ok()?;
                let message = parts.next()?.strip_prefix(' ')?.to_string();
                Some(Diag { line, col, message })
            });
            parsed.unwrap_or_else(|| {
                panic!("stderr line is not `{prefix}LINE:COL: message`: {l:?}\nstderr:\n{stderr}")
            })
        })
        .collect()
}

/// Asserts `yaml` passes: exit 0, `FILE: ok` on stdout, nothing on stderr.
#[track_caller]
pub(crate) fn assert_valid(yaml: &str) {
    let (code, stdout, stderr) = check(yaml);
    assert_eq!(
        (code, stdout.as_str(), stderr.trim()),
        (0, format!("{POLICY}: ok\n").as_str(), ""),
        "policy should be valid:\n{}",
        numbered(yaml)
    );
}

/// Asserts `yaml` fails with exactly one diagnostic, at `line` (and `col` when given), whose
/// message contains `phrase`. Returns the message.
#[track_caller]
pub(crate) fn assert_rejected(yaml: &str, line: u64, col: Option<u64>, phrase: &str) -> String {
    let (code, stdout, stderr) = check(yaml);
    let context = format!("policy:\n{}stderr:\n{stderr}", numbered(yaml));
    assert_eq!(code, 1, "exit code; {context}");
    assert!(
        !stdout.contains(": ok"),
        "a failing file is not ok; {context}"
    );
    assert!(!stderr.contains("panicked"), "{context}");
    let diags = diagnostics(Path::new(POLICY), &stderr);
    assert_eq!(diags.len(), 1, "expected exactly one diagnostic; {context}");
    let d = &diags[0];
    let expected = match col {
        Some(col) => format!("{line}:{col}"),
        None => format!("{line}:{}", d.col),
    };
    assert_eq!(
        format!("{}:{}", d.line, d.col),
        expected,
        "location; {context}"
    );
    assert!(
        !d.message.trim().is_empty() && d.message.contains(phrase),
        "message should contain {phrase:?}; {context}"
    );
    d.message.clone()
}

/// Asserts that arbitrary `bytes` are refused cleanly: exit 1 with short, located messages.
#[track_caller]
fn assert_refused_cleanly(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.yaml");
    fs::write(&file, bytes).unwrap();
    let (code, stdout, stderr) = check_files(&[&file]);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.len() < 4096,
        "the message must not echo the input back ({} bytes)",
        stderr.len()
    );
    let diags = diagnostics(&file, &stderr);
    assert!(!diags.is_empty(), "no diagnostic on stderr");
    assert!(
        diags.iter().all(|d| !d.message.trim().is_empty()),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Valid policies, and `${env:…}` / `${file:…}`
// ---------------------------------------------------------------------------------------------

#[test]
fn base_policy_is_valid() {
    assert_valid(BASE);
}

const DESIGN_EXAMPLE: &str = include_str!("../../policies/mobile.yaml");

#[test]
fn design_example_loads_with_its_secret_set() {
    let policy = write_policy(DESIGN_EXAMPLE);
    let mut cmd = bff_check();
    cmd.arg(policy.path()).env("USER_SVC_TOKEN", "t0ken");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        (code, stdout, stderr.trim()),
        (0, format!("{}: ok\n", policy.path().display()), "")
    );
}

#[test]
fn design_example_without_its_secret_names_the_variable_and_the_credential_line() {
    let policy = write_policy(DESIGN_EXAMPLE);
    let line = DESIGN_EXAMPLE
        .lines()
        .position(|l| l.contains("${env:USER_SVC_TOKEN}"))
        .expect("the example has the credential")
        + 1;
    assert_eq!(line, 17, "the design's example changed; update this test");
    let mut cmd = bff_check();
    cmd.arg(policy.path()).env_remove("USER_SVC_TOKEN");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, "");
    let diags = diagnostics(policy.path(), &stderr);
    assert_eq!(diags.len(), 1, "{stderr}");
    // Column 49 is the credential's `value` string.
    assert_eq!((diags[0].line, diags[0].col), (17, 49), "{stderr}");
    assert!(diags[0].message.contains("USER_SVC_TOKEN"), "{stderr}");
    assert!(diags[0].message.contains("not set"), "{stderr}");
}

/// `users` on line 9 with a credential read from `path`.
fn with_file_credential(path: &str) -> String {
    edit(
        BASE,
        9,
        "timeout: 300ms",
        &format!("credential: {{ header: Authorization, value: \"Bearer ${{file:{path}}}\" }}"),
    )
}

#[test]
fn file_references_resolve_relative_to_the_policy_file() {
    // Check `conf/policy.yaml` from the parent dir: `secrets/token` exists only next to the
    // policy, so resolving against the working directory would fail.
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("conf");
    fs::create_dir_all(conf.join("secrets")).unwrap();
    fs::write(conf.join("secrets/token"), "s3cret\n").unwrap();
    fs::write(
        conf.join("policy.yaml"),
        with_file_credential("secrets/token"),
    )
    .unwrap();
    let mut cmd = bff_check();
    cmd.current_dir(root.path()).arg("conf/policy.yaml");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        (code, stdout.as_str(), stderr.trim()),
        (0, "conf/policy.yaml: ok\n", "")
    );

    // The file's content really is used: a value that cannot be a header is refused.
    fs::write(conf.join("secrets/token"), "two\nlines\n").unwrap();
    let mut cmd = bff_check();
    cmd.current_dir(root.path()).arg("conf/policy.yaml");
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 1, "{stderr}");
    let diags = diagnostics(Path::new("conf/policy.yaml"), &stderr);
    assert_eq!(diags.len(), 1, "{stderr}");
    assert_eq!(diags[0].line, 9, "{stderr}");
    assert!(
        diags[0].message.contains("not a valid header value"),
        "{stderr}"
    );
}

#[test]
fn missing_file_reference_is_an_error_naming_the_path() {
    let message = assert_rejected(
        &with_file_credential("secrets/absent-token"),
        9,
        None,
        "cannot read",
    );
    assert!(message.contains("secrets/absent-token"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Unknown keys
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_top_level_key_is_named() {
    let yaml = insert(BASE, 39, "colour: red");
    assert_rejected(&yaml, 40, Some(1), "unknown field `colour`");
}

#[test]
fn unknown_route_key_is_named() {
    let yaml = insert(BASE, 15, "    colour: red");
    assert_rejected(&yaml, 16, Some(5), "unknown field `colour`");
}

#[test]
fn unknown_fetch_key_is_named() {
    let yaml = insert(BASE, 24, "        retries: 3");
    assert_rejected(&yaml, 25, Some(9), "unknown field `retries`");
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

#[test]
fn template_variable_from_an_unknown_source_is_refused() {
    let yaml = edit(BASE, 23, "{path.id}", "{env.HOME}");
    let message = assert_rejected(&yaml, 23, Some(15), "{env.HOME}");
    assert!(message.contains("unknown source `env`"), "{message}");
}

#[test]
fn path_variable_must_be_a_route_parameter() {
    let yaml = edit(BASE, 23, "{path.id}", "{path.uid}");
    assert_rejected(
        &yaml,
        23,
        Some(15),
        "`{path.uid}` is not a parameter of the route's path",
    );
}

#[test]
fn jwt_variable_needs_auth() {
    // Without lines 2-7 (`auth`), the orders fetch path moves from line 28 to line 22.
    let yaml = remove(BASE, 2..=7);
    let message = assert_rejected(&yaml, 22, Some(15), "{jwt.sub}");
    assert!(message.contains("no `auth.jwt`"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Fields
// ---------------------------------------------------------------------------------------------

#[test]
fn fetch_without_fields_is_refused() {
    // The fetch is located at its first key (line 22 under `user:`).
    let yaml = remove(BASE, 25..=25);
    let message = assert_rejected(&yaml, 22, Some(9), "needs `fields`");
    assert!(message.contains("fetch `user`"), "{message}");
}

#[test]
fn proxy_without_fields_is_refused() {
    let yaml = remove(BASE, 38..=38);
    assert_rejected(&yaml, 36, Some(7), "needs `fields`");
}

#[test]
fn empty_fields_are_refused() {
    let yaml = edit(BASE, 25, "[userId, displayName]", "[]");
    assert_rejected(&yaml, 25, Some(17), "at least one field");
}

#[test]
fn bad_field_spec_is_refused() {
    let yaml = edit(BASE, 25, "displayName", r#""items[]x""#);
    assert_rejected(&yaml, 25, None, "`items[]x`");
}

#[test]
fn conflicting_field_specs_are_refused() {
    let yaml = edit(BASE, 25, "[userId, displayName]", "[a, a.b]");
    let message = assert_rejected(&yaml, 25, None, "field `a.b`");
    assert!(message.contains("conflicts with field `a`"), "{message}");
}

#[test]
fn field_errors_point_at_the_entry_at_fault() {
    // Block list: `a` on line 26, `a.b` (at fault) on line 27.
    let yaml = edit(
        BASE,
        25,
        " [userId, displayName]",
        "\n          - a\n          - a.b",
    );
    assert_rejected(&yaml, 27, Some(13), "field `a.b`");
    let yaml = edit(
        BASE,
        25,
        " [userId, displayName]",
        "\n          - userId\n          - items[]x",
    );
    assert_rejected(&yaml, 27, Some(13), "`items[]x`");
}

// ---------------------------------------------------------------------------------------------
// Critical / optional
// ---------------------------------------------------------------------------------------------

#[test]
fn optional_fetch_needs_a_fallback() {
    let yaml = remove(BASE, 31..=31);
    let message = assert_rejected(&yaml, 27, Some(9), "fetch `orders`");
    assert!(message.contains("critical: true"), "{message}");
    assert!(message.contains("fallback"), "{message}");
}

#[test]
fn critical_fetch_with_a_fallback_is_refused() {
    let yaml = insert(BASE, 25, "        fallback: {}");
    let message = assert_rejected(&yaml, 26, Some(19), "fetch `user` is critical");
    assert!(message.contains("fallback"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_cache_refuses_jwt_inputs() {
    let yaml = edit(BASE, 19, "scope: user", "scope: shared");
    let message = assert_rejected(&yaml, 19, Some(12), "scope: shared");
    assert!(message.contains("fetch `orders`"), "{message}");
    assert!(message.contains("{jwt.sub}"), "{message}");
}

#[test]
fn shared_cache_without_jwt_inputs_is_fine() {
    let yaml = edit(BASE, 19, "scope: user", "scope: shared");
    assert_valid(&edit(&yaml, 28, "{jwt.sub}", "{path.id}"));
}

// ---------------------------------------------------------------------------------------------
// Routes: names, paths, methods, shape
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_route_names_are_refused() {
    let yaml = edit(BASE, 32, "order", "profile");
    assert_rejected(&yaml, 32, Some(11), "route name `profile` is used twice");
}

#[test]
fn same_method_and_path_twice_is_refused() {
    let yaml = edit(BASE, 34, "orders/{id}", "users/{id}");
    // Located at the second route (its first key).
    assert_rejected(
        &yaml,
        32,
        Some(5),
        "another route already serves GET /web/v1/users/{id}",
    );
}

#[test]
fn colliding_paths_are_refused() {
    let yaml = edit(BASE, 34, "orders/{id}", "users/{uid}");
    let yaml = edit(&yaml, 37, "{path.id}", "{path.uid}");
    let message = assert_rejected(&yaml, 32, Some(5), "/web/v1/users/{uid}");
    assert!(message.contains("collides"), "{message}");
    assert!(message.contains("/web/v1/users/{id}"), "{message}");
}

#[test]
fn same_path_with_different_methods_is_fine() {
    let yaml = edit(BASE, 34, "orders/{id}", "users/{id}");
    assert_valid(&edit(&yaml, 33, "GET", "POST"));
}

#[test]
fn bad_method_is_refused() {
    let yaml = edit(BASE, 15, "GET", "FETCH");
    assert_rejected(&yaml, 15, Some(13), "method `FETCH`");
    let yaml = edit(BASE, 15, "GET", "get");
    assert_rejected(&yaml, 15, Some(13), "method `get`");
}

#[test]
fn route_path_needs_a_leading_slash() {
    let yaml = edit(BASE, 16, "/web", "web");
    assert_rejected(&yaml, 16, Some(11), "must start with `/`");
}

#[test]
fn route_with_fetch_and_proxy_is_refused() {
    let yaml = insert(
        BASE,
        31,
        "    proxy: { upstream: orders, path: /x, fields: [id] }",
    );
    let message = assert_rejected(&yaml, 14, Some(11), "exactly one of `fetch` or `proxy`");
    assert!(message.contains("route `profile`"), "{message}");
}

#[test]
fn route_with_neither_fetch_nor_proxy_is_refused() {
    let yaml = remove(BASE, 35..=38);
    let message = assert_rejected(&yaml, 32, Some(11), "exactly one of `fetch` or `proxy`");
    assert!(message.contains("route `order`"), "{message}");
}

#[test]
fn cache_on_a_proxy_route_is_refused() {
    let yaml = insert(BASE, 34, "    cache: { scope: shared, ttl: 60s }");
    assert_rejected(&yaml, 35, Some(12), "`cache` applies to `fetch` routes");
}

// ---------------------------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_upstreams_are_refused() {
    let fetch = edit(BASE, 22, "users", "billing");
    assert_rejected(&fetch, 22, Some(19), "upstream `billing` is not defined");
    let proxy = edit(BASE, 36, "orders", "billing");
    assert_rejected(&proxy, 36, Some(17), "upstream `billing` is not defined");
    let fallthrough = edit(BASE, 39, "users", "billing");
    assert_rejected(
        &fallthrough,
        39,
        Some(14),
        "upstream `billing` is not defined",
    );
}

#[test]
fn upstream_url_must_be_http_or_https() {
    // A new, unreferenced upstream, so that nothing else depends on it.
    for url in ["ftp://127.0.0.1:9103", "127.0.0.1:9103"] {
        let yaml = insert(BASE, 12, &format!("  billing:\n    url: {url}"));
        let message = assert_rejected(&yaml, 14, Some(10), "upstream `billing`");
        assert!(message.contains("http://"), "{url}: {message}");
    }
}

#[test]
fn bad_upstream_url_does_not_cascade_into_undefined_upstreams() {
    let yaml = edit(BASE, 11, "http://127.0.0.1:9102", "ftp://127.0.0.1:9102");
    assert_rejected(
        &yaml,
        11,
        Some(10),
        "url must start with http:// or https://",
    );
}

#[test]
fn invalid_upstream_name_is_refused() {
    let yaml = insert(BASE, 12, "  Billing Svc: { url: http://127.0.0.1:9103 }");
    assert_rejected(&yaml, 13, None, "upstream name `Billing Svc`");
}

#[test]
fn invalid_upstream_name_points_at_the_name() {
    let yaml = insert(BASE, 12, "  Billing:\n    url: http://127.0.0.1:9103");
    assert_rejected(&yaml, 13, Some(3), "upstream name `Billing`");
}

// ---------------------------------------------------------------------------------------------
// Upstream options: concurrency, retries, circuit breaker, headers
// ---------------------------------------------------------------------------------------------

/// `BASE` with `text` (lines indented 4 spaces) added to upstream `orders`, from line 13.
fn with_orders_option(text: &str) -> String {
    insert(BASE, 12, text)
}

#[test]
fn policy_with_every_upstream_option_and_fetch_dependencies_loads() {
    let yaml = with_orders_option(
        "    concurrency: 32
    retries: { attempts: 2, budget: 0.1, min_per_second: 5 }
    circuit_breaker:
      consecutive_failures: 3
      failure_ratio: 0.25
      min_requests: 10
      window: 30s
      open_for: 2s
    headers:
      X-User-Id: \"{jwt.sub}\"
      X-Tenant: \"tenant={jwt.tid}; v=1\"",
    );
    // `users` without a breaker, and with retries at their defaults but `attempts`.
    let yaml = edit(
        &yaml,
        9,
        "timeout: 300ms",
        "timeout: 300ms, retries: { attempts: 1 }, circuit_breaker: { enabled: false }",
    );
    // A third fetch that waits for both others (an optional fetch may wait for anything).
    let yaml = insert(
        &yaml,
        42,
        "      tier:
        upstream: users
        path: /tiers/{fetch.user.loyalty.tier}?n={fetch.orders.count}&u={fetch.user.id}
        fields: [name]
        fallback: {}",
    );
    assert_valid(&yaml);
}

#[test]
fn zero_concurrency_is_refused() {
    let yaml = with_orders_option("    concurrency: 0");
    let message = assert_rejected(&yaml, 13, Some(18), "`concurrency` must be at least 1");
    assert!(message.contains("upstream `orders`"), "{message}");
}

#[test]
fn retry_attempts_must_be_one_to_five() {
    for attempts in ["0", "6"] {
        let yaml = with_orders_option(&format!("    retries: {{ attempts: {attempts} }}"));
        let message = assert_rejected(&yaml, 13, Some(26), "`retries.attempts` must be 1 to 5");
        assert!(message.contains("upstream `orders`"), "{message}");
    }
}

#[test]
fn retries_need_attempts() {
    let yaml = with_orders_option("    retries: { budget: 0.5 }");
    let message = assert_rejected(&yaml, 13, Some(14), "`retries` needs `attempts`");
    assert!(message.contains("upstream `orders`"), "{message}");
}

#[test]
fn retry_budget_must_be_a_fraction() {
    for budget in ["0", "1.5", "-0.1"] {
        let yaml = with_orders_option(&format!("    retries: {{ attempts: 2, budget: {budget} }}"));
        let message = assert_rejected(&yaml, 13, Some(37), "`retries.budget` must be a fraction");
        assert!(message.contains("upstream `orders`"), "{message}");
    }
}

#[test]
fn circuit_breaker_values_are_checked() {
    for (key, value, phrase) in [
        ("consecutive_failures", "0", "must be at least 1"),
        ("min_requests", "0", "must be at least 1"),
        ("failure_ratio", "0", "must be a fraction"),
        ("failure_ratio", "1.5", "must be a fraction"),
        ("window", "0s", "must be longer than zero"),
        ("open_for", "0ms", "must be longer than zero"),
    ] {
        // Checked even when the breaker is off, so turning it on cannot break the policy.
        for enabled in ["true", "false"] {
            let yaml = with_orders_option(&format!(
                "    circuit_breaker:\n      enabled: {enabled}\n      {key}: {value}"
            ));
            let message = assert_rejected(
                &yaml,
                15,
                Some(9 + key.len() as u64),
                &format!("`circuit_breaker.{key}` {phrase}"),
            );
            assert!(message.contains("upstream `orders`"), "{message}");
        }
    }
}

#[test]
fn unknown_circuit_breaker_key_is_named() {
    let yaml = with_orders_option("    circuit_breaker: { threshold: 3 }");
    assert_rejected(&yaml, 13, None, "unknown field `threshold`");
}

#[test]
fn upstream_header_name_must_be_valid() {
    let yaml = with_orders_option("    headers:\n      \"X Id\": a");
    let message = assert_rejected(&yaml, 14, Some(7), "not a valid header name");
    assert!(
        message.contains("upstream `orders`: header `X Id`"),
        "{message}"
    );
}

#[test]
fn upstream_header_value_must_be_valid() {
    let yaml = with_orders_option("    headers:\n      X-Id: \"a\\x01b\"");
    let message = assert_rejected(&yaml, 14, Some(13), "not a valid header value");
    assert!(message.contains("header `X-Id`"), "{message}");
    // A broken template is named as a value, not as a path.
    let yaml = with_orders_option("    headers:\n      X-Id: \"{jwt.sub\"");
    let message = assert_rejected(&yaml, 14, Some(13), "value `{jwt.sub` has a `{`");
    assert!(message.contains("header `X-Id`"), "{message}");
}

#[test]
fn upstream_headers_the_sidecar_sets_are_refused() {
    for header in [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "X-BFF-Client",
        "X-Trace-Id",
        "traceparent",
    ] {
        let yaml = with_orders_option(&format!("    headers:\n      {header}: x"));
        let message = assert_rejected(&yaml, 14, Some(7), "cannot be set");
        assert!(
            message.contains(&format!("upstream `orders`: header `{header}`")),
            "{message}"
        );
    }
}

#[test]
fn upstream_header_cannot_override_the_credential() {
    let yaml = with_orders_option(
        "    credential: { header: X-Api-Key, value: k3y }\n    headers:\n      x-api-key: \"{jwt.sub}\"",
    );
    let message = assert_rejected(&yaml, 15, Some(7), "`credential` sets it");
    assert!(message.contains("header `x-api-key`"), "{message}");
}

#[test]
fn upstream_header_given_twice_is_refused() {
    let yaml = with_orders_option("    headers:\n      X-Id: a\n      x-id: b");
    assert_rejected(&yaml, 15, Some(7), "header `x-id` is given twice");
}

#[test]
fn upstream_headers_may_only_use_jwt_claims() {
    for var in ["{path.id}", "{query.n}", "{fetch.user.id}"] {
        let yaml = with_orders_option(&format!("    headers:\n      X-Id: \"{var}\""));
        let message = assert_rejected(&yaml, 14, Some(13), var);
        assert!(
            message.contains("upstream `orders`: header `X-Id`"),
            "{message}"
        );
        assert!(message.contains("every route that calls it"), "{message}");
        assert!(message.contains("{jwt.*}"), "{message}");
    }
}

#[test]
fn upstream_header_jwt_claim_needs_auth() {
    // Without lines 2-7 (`auth`), the new header is on line 8 and the orders fetch path, made
    // free of `{jwt.sub}`, on line 24.
    let yaml = with_orders_option("    headers:\n      X-User: \"{jwt.sub}\"");
    let yaml = edit(&yaml, 30, "{jwt.sub}", "{path.id}");
    let yaml = remove(&yaml, 2..=7);
    let message = assert_rejected(&yaml, 8, Some(15), "{jwt.sub}");
    assert!(message.contains("header `X-User`"), "{message}");
    assert!(message.contains("no `auth.jwt`"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Fetch dependencies: `{fetch.NAME.FIELD}`
// ---------------------------------------------------------------------------------------------

#[test]
fn fetch_variable_must_name_a_fetch_of_the_route() {
    let yaml = edit(BASE, 23, "{path.id}", "{fetch.profile.id}");
    let message = assert_rejected(
        &yaml,
        23,
        Some(15),
        "route `profile` has no fetch `profile`",
    );
    assert!(
        message.contains("fetch `user` uses `{fetch.profile.id}`"),
        "{message}"
    );
}

#[test]
fn fetch_cannot_use_its_own_answer() {
    let yaml = edit(BASE, 23, "{path.id}", "{fetch.user.id}");
    let message = assert_rejected(&yaml, 23, Some(15), "fetch `user` uses `{fetch.user.id}`");
    assert!(message.contains("its own answer"), "{message}");
}

#[test]
fn fetch_cycle_is_refused_and_named() {
    // Both critical, so that only the cycle is wrong.
    let yaml = edit(BASE, 23, "{path.id}", "{fetch.orders.userId}");
    let yaml = edit(&yaml, 28, "limit={query.n}", "tier={fetch.user.tier}");
    let yaml = edit(&yaml, 31, "fallback: []", "critical: true");
    let message = assert_rejected(
        &yaml,
        23,
        Some(15),
        "fetches `user` → `orders` → `user` form a cycle",
    );
    assert!(message.contains("route `profile`"), "{message}");
}

#[test]
fn fetch_cycle_through_three_fetches_is_reported_once() {
    let yaml = edit(BASE, 23, "{path.id}", "{fetch.third.id}");
    let yaml = edit(&yaml, 28, "limit={query.n}", "tier={fetch.user.tier}");
    let yaml = edit(&yaml, 31, "fallback: []", "critical: true");
    let yaml = insert(
        &yaml,
        31,
        "      third: { upstream: users, path: \"/x/{fetch.orders.id}\", critical: true, fields: [a] }",
    );
    assert_rejected(
        &yaml,
        23,
        Some(15),
        "fetches `user` → `third` → `orders` → `user` form a cycle",
    );
}

#[test]
fn critical_fetch_cannot_wait_for_an_optional_one() {
    let yaml = edit(
        BASE,
        23,
        "{path.id}",
        "{path.id}?since={fetch.orders.latest}",
    );
    let message = assert_rejected(
        &yaml,
        23,
        Some(15),
        "critical fetch `user` uses the answer of optional fetch `orders`",
    );
    assert!(
        message.contains("make `orders` critical or `user` optional"),
        "{message}"
    );
}

#[test]
fn fetch_variable_in_a_proxy_route_is_refused() {
    let yaml = edit(BASE, 37, "{path.id}", "{fetch.user.id}");
    let message = assert_rejected(&yaml, 37, Some(13), "`{fetch.user.id}`");
    assert!(message.contains("not a `proxy` route"), "{message}");
}

#[test]
fn shared_cache_refuses_jwt_in_upstream_headers() {
    let yaml = edit(BASE, 19, "scope: user", "scope: shared");
    let yaml = edit(&yaml, 28, "{jwt.sub}", "{path.id}");
    let yaml = edit(
        &yaml,
        9,
        "timeout: 300ms",
        r#"timeout: 300ms, headers: { X-User-Id: "{jwt.sub}" }"#,
    );
    let message = assert_rejected(&yaml, 19, Some(12), "scope: shared");
    assert!(message.contains("fetch `user`"), "{message}");
    assert!(message.contains("upstream `users`"), "{message}");
    assert!(message.contains("x-user-id"), "{message}");
}

#[test]
fn shared_cache_refuses_fetches_that_wait_for_personal_ones() {
    let yaml = edit(BASE, 19, "scope: user", "scope: shared");
    let yaml = edit(&yaml, 23, "{path.id}", "{jwt.sub}");
    let yaml = edit(&yaml, 28, "{jwt.sub}", "{path.id}");
    let yaml = edit(&yaml, 28, "limit={query.n}", "tier={fetch.user.tier}");
    let (code, _, stderr) = check(&yaml);
    assert_eq!(code, 1, "{stderr}");
    let diags = diagnostics(Path::new(POLICY), &stderr);
    assert_eq!(diags.len(), 2, "{stderr}");
    assert!(
        diags.iter().all(|d| (d.line, d.col) == (19, 12)),
        "{stderr}"
    );
    assert!(
        diags[0].message.contains("fetch `user` uses `{jwt.sub}`"),
        "{stderr}"
    );
    assert!(
        diags[1]
            .message
            .contains("fetch `orders` depends on fetch `user`, which uses `{jwt.sub}`"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Scalars: durations, version
// ---------------------------------------------------------------------------------------------

#[test]
fn duration_without_a_unit_is_refused() {
    let yaml = edit(BASE, 12, "250ms", "300");
    let message = assert_rejected(&yaml, 12, Some(14), "`300` is not a duration");
    assert!(
        message.contains("300ms"),
        "the message shows the way: {message}"
    );
}

#[test]
fn version_zero_is_refused() {
    let yaml = edit(BASE, 17, "version: 3", "version: 0");
    assert_rejected(&yaml, 17, Some(14), "`version` starts at 1");
}

// ---------------------------------------------------------------------------------------------
// YAML syntax
// ---------------------------------------------------------------------------------------------

#[test]
fn tab_indentation_is_a_located_error() {
    let yaml = edit(BASE, 11, "    url", "\turl");
    assert_rejected(&yaml, 11, None, "tab");
}

#[test]
fn bad_indentation_is_a_located_error() {
    let yaml = edit(BASE, 12, "    timeout", "   timeout");
    assert_rejected(&yaml, 12, None, "");
}

#[test]
fn duplicate_mapping_key_is_refused() {
    let yaml = insert(BASE, 11, "    url: http://127.0.0.1:9103");
    assert_rejected(&yaml, 12, Some(5), "duplicate mapping key");
}

#[test]
fn duplicate_upstream_and_fetch_names_are_refused() {
    let yaml = insert(BASE, 9, "  users: { url: http://127.0.0.1:9105 }");
    assert_rejected(&yaml, 10, Some(3), "duplicate mapping key: users");
    let yaml = insert(
        BASE,
        25,
        "      user: { upstream: users, path: /u, critical: true, fields: [a] }",
    );
    assert_rejected(&yaml, 26, Some(7), "duplicate mapping key: user");
}

#[test]
fn duplicate_mapping_key_message_speaks_to_the_policy_author() {
    let yaml = insert(BASE, 11, "    url: http://127.0.0.1:9103");
    let message = assert_rejected(&yaml, 12, Some(5), "duplicate mapping key");
    assert!(message.contains("url"), "{message}");
    assert!(!message.contains("DuplicateKeyPolicy"), "{message}");
    assert!(!message.contains("Options"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------------------------

#[test]
fn jwt_with_two_key_sources_is_refused() {
    let yaml = insert(BASE, 7, "    jwks_file: keys/jwks.json");
    // No route input from the token, so that nothing else depends on `auth`.
    let yaml = edit(&yaml, 29, "{jwt.sub}", "{path.id}");
    // Located at the `jwt` block (its first key).
    assert_rejected(&yaml, 4, Some(5), "exactly one key source");
}

#[test]
fn invalid_auth_does_not_cascade_into_missing_auth() {
    let yaml = insert(BASE, 7, "    jwks_file: keys/jwks.json");
    assert_rejected(&yaml, 4, Some(5), "exactly one key source");
}

#[test]
fn hs256_secret_needs_hs256_in_algorithms() {
    let yaml = edit(
        BASE,
        7,
        "jwks_url: http://127.0.0.1:9100/jwks.json",
        r#"hs256_secret: "0123456789abcdef0123456789abcdef""#,
    );
    assert_rejected(&yaml, 7, Some(19), "does not list HS256");
}

#[test]
fn unknown_algorithm_is_refused() {
    let yaml = edit(BASE, 6, "[RS256]", "[RS256, RS257]");
    assert_rejected(&yaml, 6, Some(25), "`RS257`");
    let yaml = edit(BASE, 6, "[RS256]", "[RS256, none]");
    assert_rejected(&yaml, 6, Some(25), "`none`");
}

// ---------------------------------------------------------------------------------------------
// Several problems, several files
// ---------------------------------------------------------------------------------------------

#[test]
fn every_error_in_a_file_is_reported() {
    let yaml = edit(BASE, 15, "GET", "FETCH");
    let yaml = edit(&yaml, 17, "version: 3", "version: 0");
    let yaml = edit(&yaml, 36, "orders", "billing");
    let (code, stdout, stderr) = check(&yaml);
    assert_eq!((code, stdout.as_str()), (1, ""), "{stderr}");
    let mut found: Vec<(u64, u64)> = diagnostics(Path::new(POLICY), &stderr)
        .iter()
        .map(|d| (d.line, d.col))
        .collect();
    found.sort_unstable();
    assert_eq!(found, [(15, 13), (17, 14), (36, 17)], "{stderr}");
}

#[test]
fn checking_several_files_reports_each() {
    let bad = write_policy(&edit(BASE, 17, "version: 3", "version: 0"));
    let good = write_policy(BASE);
    // The bad file first: checking goes on past it.
    let (code, stdout, stderr) = check_files(&[bad.path(), good.path()]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stdout, format!("{}: ok\n", good.path().display()));
    let diags = diagnostics(bad.path(), &stderr);
    assert_eq!(diags.len(), 1, "{stderr}");
    assert_eq!((diags[0].line, diags[0].col), (17, 14), "{stderr}");
}

#[test]
fn a_file_that_cannot_be_read_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let (code, _, stderr) = check_files(&[&missing]);
    assert_eq!(code, 1, "{stderr}");
    let diags = diagnostics(&missing, &stderr);
    assert_eq!(diags.len(), 1, "{stderr}");
    assert!(diags[0].message.contains("cannot read"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Hostile input: exit 1 with a message, never a crash or a hang
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[3]
        })
        .collect()
}

#[test]
fn two_megabytes_of_binary_garbage_is_refused() {
    assert_refused_cleanly(&noise(2 << 20, 0x9e37_79b9_7f4a_7c15));
}

#[test]
fn two_megabytes_of_yaml_punctuation_is_refused() {
    const ALPHABET: &[u8] = b" \t\n:-[]{}#&*!|>'\"%@`,?abc01";
    let text: Vec<u8> = noise(2 << 20, 42)
        .into_iter()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()])
        .collect();
    assert_refused_cleanly(&text);
}

#[test]
fn ten_thousand_nested_sequences_are_refused() {
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    assert_refused_cleanly(deep.as_bytes());
    assert_refused_cleanly("[".repeat(10_000).as_bytes());
    assert_refused_cleanly(format!("client: {deep}\n").as_bytes());
    assert_refused_cleanly("{a: ".repeat(10_000).as_bytes());
}

#[test]
fn deep_nesting_inside_a_fallback_is_refused() {
    // `fallback` takes any JSON value, so nesting there reaches a recursive deserializer.
    let flow = edit(BASE, 31, "[]", &"[".repeat(10_000));
    assert_refused_cleanly(flow.as_bytes());
    let block: String = (0..10_000)
        .map(|depth| format!("{}a:\n", " ".repeat(10 + depth)))
        .collect();
    let block = edit(BASE, 31, " []", &format!("\n{block}"));
    assert_refused_cleanly(block.as_bytes());
}

#[test]
fn alias_bomb_is_refused() {
    // Nine levels of nine aliases: 387 million strings if expanded.
    let mut bomb = String::from("\n          l0: &l0 [x, x, x, x, x, x, x, x, x]");
    for level in 1..9 {
        let prev = format!("*l{}", level - 1);
        bomb.push_str(&format!(
            "\n          l{level}: &l{level} [{}]",
            vec![prev; 9].join(", ")
        ));
    }
    let yaml = edit(BASE, 31, " []", &bomb);
    assert_refused_cleanly(yaml.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Machine credentials: OAuth2 client credentials
// ---------------------------------------------------------------------------------------------

/// `orders` (lines 10-12) with an `oauth2` block on lines 13-17, and `extra` lines after it.
fn with_oauth2(extra: &str) -> String {
    with_orders_option(&format!(
        "    oauth2:
      token_url: https://id.example.com/oauth/token
      client_id: bff-web
      client_secret: \"${{env:PATH}}\"
      scope: orders:read orders:write{extra}"
    ))
}

#[test]
fn oauth2_client_credentials_load() {
    assert_valid(&with_oauth2(""));
    // http too, and no scope.
    assert_valid(&remove(
        &edit(&with_oauth2(""), 14, "https://", "http://"),
        17..=17,
    ));
}

#[test]
fn oauth2_and_credential_together_are_refused() {
    let yaml = with_oauth2("\n    credential: { header: X-Api-Key, value: k3y }");
    let message = assert_rejected(&yaml, 14, Some(7), "cannot both be given");
    assert!(message.contains("upstream `orders`"), "{message}");
}

#[test]
fn oauth2_token_url_must_be_http_or_https_with_a_host() {
    for bad in [
        "ftp://id.example.com/token",
        "/oauth/token",
        "not a url",
        "https://",
    ] {
        let yaml = edit(
            &with_oauth2(""),
            14,
            "https://id.example.com/oauth/token",
            &format!("\"{bad}\""),
        );
        let message = assert_rejected(&yaml, 14, Some(18), "http:// or https://");
        assert!(message.contains("`oauth2.token_url`"), "{bad}: {message}");
    }
}

#[test]
fn oauth2_without_client_id_is_refused_naming_the_upstream() {
    let yaml = remove(&with_oauth2(""), 15..=15);
    let message = assert_rejected(&yaml, 14, Some(7), "`oauth2` needs `client_id`");
    assert!(message.contains("upstream `orders`"), "{message}");
}

#[test]
fn oauth2_without_token_url_or_secret_is_refused() {
    let yaml = remove(&with_oauth2(""), 14..=14);
    assert_rejected(&yaml, 14, Some(7), "`oauth2` needs `token_url`");
    let yaml = remove(&with_oauth2(""), 16..=16);
    assert_rejected(&yaml, 14, Some(7), "`oauth2` needs `client_secret`");
}

#[test]
fn oauth2_client_secret_from_a_missing_variable_names_it() {
    let yaml = edit(
        &with_oauth2(""),
        16,
        "${env:PATH}",
        "${env:BFF_TEST_SURELY_UNSET_OAUTH}",
    );
    assert_rejected(
        &yaml,
        16,
        Some(22),
        "BFF_TEST_SURELY_UNSET_OAUTH` is not set",
    );
}

#[test]
fn oauth2_scope_must_be_scope_names() {
    let yaml = edit(
        &with_oauth2(""),
        17,
        "orders:read orders:write",
        "\"orders:read  \\\"write\\\"\"",
    );
    assert_rejected(&yaml, 17, Some(14), "`oauth2.scope`");
}

#[test]
fn oauth2_unknown_key_is_named() {
    let yaml = edit(&with_oauth2(""), 15, "client_id", "client_name");
    assert_rejected(&yaml, 15, None, "client_name");
}

#[test]
fn upstream_header_cannot_override_the_oauth2_token() {
    let yaml = with_oauth2("\n    headers:\n      Authorization: \"{jwt.sub}\"");
    let message = assert_rejected(&yaml, 19, Some(7), "`oauth2` sets it");
    assert!(message.contains("header `Authorization`"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Auth methods, route `auth` and `scopes`
// ---------------------------------------------------------------------------------------------

/// A keys file with one valid line, in a temp dir that lives as long as the value.
fn keys_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.txt");
    fs::write(&path, text).unwrap();
    (dir, path.display().to_string())
}

const KEY_LINE: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae acme\n";

/// BASE with `api_key` after `jwt` (lines 8-9) reading `file`.
fn with_api_key(header: &str, file: &str) -> String {
    insert(
        BASE,
        7,
        &format!("  api_key:\n    header: {header}\n    keys_file: \"{file}\""),
    )
}

#[test]
fn api_keys_and_route_auth_load() {
    let (_dir, file) = keys_file(KEY_LINE);
    let yaml = with_api_key("X-Api-Key", &file);
    // Three lines were inserted after line 7: `users` is on line 12, `method` on line 18.
    let yaml = edit(
        &yaml,
        12,
        "timeout: 300ms",
        "timeout: 300ms, headers: { X-Partner: \"{auth.client}\" }",
    );
    assert_valid(&insert(&yaml, 18, "    auth: optional"));
}

#[test]
fn auth_needs_a_method() {
    let yaml = remove(BASE, 3..=7);
    let yaml = edit(&yaml, 2, "auth:", "auth: {}");
    let yaml = edit(&yaml, 23, "{jwt.sub}", "{path.id}");
    assert_rejected(&yaml, 2, None, "at least one method");
}

#[test]
fn api_key_header_cannot_be_a_credential_header() {
    let (_dir, file) = keys_file(KEY_LINE);
    for header in ["Authorization", "Cookie", "Host"] {
        assert_rejected(
            &with_api_key(header, &file),
            9,
            Some(13),
            "use a header of its own",
        );
    }
}

#[test]
fn api_keys_file_must_exist_and_hold_hashes() {
    let message = assert_rejected(
        &with_api_key("X-Api-Key", "/nonexistent/keys.txt"),
        10,
        Some(16),
        "cannot read it",
    );
    assert!(message.contains("/nonexistent/keys.txt"), "{message}");
    // A raw key where the hash belongs, on the file's line 2.
    let (_dir, file) = keys_file(&format!("{KEY_LINE}sk_live_123 globex\n"));
    let message = assert_rejected(
        &with_api_key("X-Api-Key", &file),
        10,
        Some(16),
        "line 2: `sk_live_123` is not a SHA-256 hash",
    );
    assert!(!message.contains("acme"), "{message}");
}

#[test]
fn jwt_cookie_name_must_be_a_token() {
    let yaml = insert(BASE, 7, "    cookie: \"my session\"");
    assert_rejected(&yaml, 8, Some(13), "not a valid cookie name");
}

#[test]
fn route_auth_needs_policy_auth() {
    let yaml = remove(BASE, 2..=7);
    // Without `auth`, `{jwt.sub}` (line 22) is refused too: use the path instead.
    let yaml = edit(&yaml, 22, "{jwt.sub}", "{path.id}");
    let yaml = insert(&yaml, 10, "    auth: required");
    assert_rejected(&yaml, 11, Some(11), "needs the policy's `auth` section");
    assert_valid(&edit(&yaml, 11, "required", "none"));
}

#[test]
fn route_auth_is_one_of_three() {
    let yaml = insert(BASE, 15, "    auth: sometimes");
    assert_rejected(&yaml, 16, Some(11), "sometimes");
}

#[test]
fn scopes_need_a_required_token() {
    let yaml = insert(BASE, 15, "    auth: optional\n    scopes: [orders.read]");
    assert_rejected(&yaml, 17, Some(13), "need `auth: required`");
    let yaml = insert(BASE, 15, "    scopes: []");
    assert_rejected(&yaml, 16, Some(13), "at least one scope");
    let yaml = insert(BASE, 15, "    scopes: [\"orders read\"]");
    assert_rejected(&yaml, 16, Some(13), "is not a scope");
    assert_valid(&insert(
        BASE,
        15,
        "    scopes: [orders.read, \"profile:write\"]",
    ));

    let (_dir, file) = keys_file(KEY_LINE);
    let keys_only = remove(&with_api_key("X-Api-Key", &file), 3..=7);
    // Lines from 8 on moved up by two: `{jwt.sub}` is on line 26, `method` on line 13.
    let keys_only = edit(&keys_only, 26, "{jwt.sub}", "{auth.client}");
    let yaml = insert(&keys_only, 13, "    scopes: [orders.read]");
    assert_rejected(&yaml, 14, Some(13), "no `auth.jwt`");
}

#[test]
fn identity_variables_need_their_method_and_a_route_that_authenticates() {
    let yaml = edit(BASE, 28, "{jwt.sub}", "{auth.client}");
    assert_rejected(&yaml, 28, Some(15), "no `auth.api_key`");
    let yaml = insert(BASE, 15, "    auth: none");
    assert_rejected(&yaml, 29, Some(15), "no value on a route with `auth: none`");
    // An upstream header that sends the subject makes every route calling it personal.
    let yaml = edit(
        BASE,
        9,
        "timeout: 300ms",
        "timeout: 300ms, headers: { X-User: \"{jwt.sub}\" }",
    );
    let yaml = edit(&yaml, 28, "{jwt.sub}", "{path.id}");
    let yaml = insert(&yaml, 15, "    auth: none");
    assert_rejected(
        &yaml,
        16,
        Some(11),
        "calls upstream `users`, whose header `x-user`",
    );
}

#[test]
fn a_fetch_cache_is_only_for_shared_data_no_other_fetch_reads() {
    // `user` (lines 21-25) may cache its answer: its path uses only `{path.id}`.
    assert_valid(&insert(BASE, 25, "        cache: { ttl: 10m, jitter: 1m }"));
    // `orders` (lines 26-31) uses `{jwt.sub}`: personal.
    let yaml = insert(BASE, 31, "        cache: { ttl: 10m }");
    assert_rejected(
        &yaml,
        32,
        Some(16),
        "only for data that is the same for every user",
    );
    let yaml = insert(BASE, 25, "        cache: { ttl: 0s }");
    assert_rejected(&yaml, 26, Some(23), "longer than zero");
    // `orders` reads `user`'s answer, which a fetch cache does not keep.
    let yaml = edit(BASE, 28, "{jwt.sub}", "{fetch.user.userId}");
    let yaml = insert(&yaml, 25, "        cache: { ttl: 10m }");
    assert_rejected(&yaml, 26, Some(16), "fetch `orders` uses its answer");
}
