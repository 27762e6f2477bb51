//! Request paths and methods through the real binary: every spelling of a route's path is that
//! route (its auth applies, the app never sees it), the app receives the normalised path,
//! control characters are refused, and `HEAD` is served wherever `GET` is, without a body.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::support::{raw, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "paths-test-secret-of-at-least-32-bytes!";

fn token() -> String {
    let mut claims = tokens::claims("web-app", 300, json!({}));
    claims["sub"] = "u1".into();
    format!("Bearer {}", tokens::hs256(&claims, SECRET))
}

struct Setup {
    bff: Bff,
    upstream: MockServer,
    app: MockServer,
    _policy: TempPolicy,
}

async fn start() -> Setup {
    let upstream = MockServer::start(|_| MockReply::json(200, json!({"name": "Ada", "x": 1})));
    let app = MockServer::start(|_| MockReply::text(200, "from the app"));
    let policy = write_policy(&format!(
        r#"client: web
auth:
  jwt: {{ issuer: "https://id.example.com/", audience: web-app, algorithms: [HS256], hs256_secret: "{SECRET}" }}
upstreams:
  profile: {{ url: "{}", timeout: 2s }}
  app: {{ url: "{}", timeout: 2s }}
routes:
  - name: me
    method: GET
    path: /p/me
    fetch: {{ me: {{ upstream: profile, path: "/users/{{jwt.sub}}", critical: true, fields: [name] }} }}
  - name: item
    method: GET
    path: /items/{{id}}
    proxy: {{ upstream: profile, path: "/items/{{path.id}}", fields: [name] }}
fallthrough: app
"#,
        upstream.url(),
        app.url()
    ));
    let bff = Bff::start(policy.path()).await;
    Setup {
        bff,
        upstream,
        app,
        _policy: policy,
    }
}

/// A response as it came off the wire.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `method target` exactly as written (no client-side path cleaning) and reads the
/// whole response.
async fn send(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Raw {
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let answer = raw::exchange(addr, request.as_bytes()).await;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {target}: no complete response: {:?}",
                String::from_utf8_lossy(&answer)
            )
        });
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no status in {head:?}"));
    Raw {
        status,
        head,
        body: answer[split + 4..].to_vec(),
    }
}

/// Spellings of `/p/me` that clients and browsers treat as that path.
const SPELLINGS: [&str; 9] = [
    "/p/me/",
    "//p/me",
    "/p//me",
    "/p/./me",
    "/p/x/../me",
    "/p/%6De",
    "/p/x/%2e%2E/me",
    "/%2e/p/me",
    "http://localhost//p/./me",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_route_path_is_the_route_and_never_reaches_the_app() {
    let s = start().await;
    for target in SPELLINGS {
        let refused = send(s.bff.addr(), "GET", target, &[]).await;
        assert_eq!(
            refused.status, 401,
            "GET {target} without a token: {}",
            refused.head
        );
        let served = send(s.bff.addr(), "GET", target, &[("Authorization", &token())]).await;
        assert_eq!(
            served.status, 200,
            "GET {target} with a token: {}",
            served.head
        );
        let body: Value = serde_json::from_slice(&served.body).expect("JSON body");
        assert_eq!(body["me"], json!({"name": "Ada"}), "GET {target}");
    }
    // A parameter route too: `/items/7/` and `/items/./7` are item 7.
    for target in ["/items/7/", "/items/./7", "//items/%37"] {
        let refused = send(s.bff.addr(), "GET", target, &[]).await;
        assert_eq!(refused.status, 401, "GET {target}: {}", refused.head);
        let served = send(s.bff.addr(), "GET", target, &[("Authorization", &token())]).await;
        assert_eq!(served.status, 200, "GET {target}: {}", served.head);
    }
    assert!(
        s.app.requests().is_empty(),
        "the app received {:?}",
        s.app.requests().iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    let seen: Vec<_> = s
        .upstream
        .requests()
        .iter()
        .map(|r| r.uri.clone())
        .collect();
    assert_eq!(seen.len(), SPELLINGS.len() + 3, "{seen:?}");
    assert!(
        seen[SPELLINGS.len()..].iter().all(|u| u == "/items/7"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_receives_the_normalised_path_and_the_query_as_sent() {
    let s = start().await;
    for (target, want) in [
        (
            "//other/./a/../b%41?q=%2e%2e/..&r=%2f",
            "/other/bA?q=%2e%2e/..&r=%2f",
        ),
        ("/files/a%2fb/../c%2Fd", "/files/c%2Fd"),
        ("/files/..%2F..%2Fetc", "/files/..%2F..%2Fetc"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/plain/path/?x=1", "/plain/path/?x=1"),
        ("http://localhost/abs//olute", "/abs/olute"),
    ] {
        let reply = send(s.bff.addr(), "GET", target, &[]).await;
        assert_eq!(reply.status, 200, "GET {target}: {}", reply.head);
        assert_eq!(reply.body, b"from the app", "GET {target}");
        let seen = s.app.requests();
        assert_eq!(
            seen.last().map(|r| r.uri.as_str()),
            Some(want),
            "GET {target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_broken_escapes_are_refused() {
    let s = start().await;
    for target in [
        "/p/me%00",
        "/other%00.json",
        "/other/%0d%0aSet-Cookie:%20a=b",
        "/other/%7F",
        "/items/%001",
        "/other/%zz",
        "/other/%4",
    ] {
        let reply = send(s.bff.addr(), "GET", target, &[("Authorization", &token())]).await;
        assert_eq!(reply.status, 400, "GET {target}: {}", reply.head);
        let body: Value = serde_json::from_slice(&reply.body).expect("JSON envelope");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "GET {target}");
    }
    assert!(s.app.requests().is_empty(), "{:?}", s.app.requests());
    assert!(
        s.upstream.requests().is_empty(),
        "{:?}",
        s.upstream.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_served_wherever_get_is_without_a_body() {
    let s = start().await;
    let auth = [("Authorization", token())];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    for target in ["/p/me", "/p/me/", "/items/7"] {
        let get = send(s.bff.addr(), "GET", target, &auth).await;
        let head = send(s.bff.addr(), "HEAD", target, &auth).await;
        assert_eq!(get.status, 200, "GET {target}: {}", get.head);
        assert_eq!(head.status, 200, "HEAD {target}: {}", head.head);
        assert!(
            head.body.is_empty(),
            "HEAD {target} sent a body: {:?}",
            head.body
        );
        assert_eq!(head.header("content-type"), get.header("content-type"));
        let length: usize = head
            .header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {target}: no Content-Length in {}", head.head));
        assert!(length > 0, "HEAD {target}");
        assert!(head.header("x-trace-id").is_some(), "HEAD {target}");
    }
    // The proxy route's upstream was called with GET, as for a GET.
    let methods: Vec<_> = s
        .upstream
        .requests()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    assert!(
        methods.iter().all(|m| m == http::Method::GET),
        "{methods:?}"
    );

    // Refusals are the route's too, without a body.
    let refused = send(s.bff.addr(), "HEAD", "/p/me", &[]).await;
    assert_eq!(refused.status, 401, "{}", refused.head);
    assert!(refused.body.is_empty());
    let wrong = send(s.bff.addr(), "POST", "/p/me/", &auth).await;
    assert_eq!(wrong.status, 405, "{}", wrong.head);
    assert_eq!(wrong.header("allow"), Some("GET, HEAD"));
    assert!(s.app.requests().is_empty(), "{:?}", s.app.requests());
}
