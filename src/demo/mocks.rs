//! demo::mocks: the built-in mock services `bff demo` serves on loopback.
//!
//! The mocks serve realistic documents: every object carries internal fields no policy
//! whitelists (a user document has 40 fields, of which the mobile homescreen passes on 4), so a
//! `curl` through the sidecar shows them gone.
//!
//! Watching degradation: every data mock (`user`, `orders`, `reco`, `catalog`) obeys control
//! requests on its own port, which replace its whole mode at once:
//!
//! | request | what the mock does with every following request |
//! |---|---|
//! | `POST /_demo?fail=1` | answers `503` |
//! | `POST /_demo?delay_ms=N` | answers N ms late |
//! | `POST /_demo?hang=1` | does not answer (until the mode changes) |
//! | `POST /_demo?fail=1&delay_ms=300` | combined: a `503`, 300 ms late |
//! | `POST /_demo` | back to normal |
//!
//! A control request answers `200` with the mode now in force, e.g.
//! `{"mock":"reco","fail":true,"delay_ms":0,"hang":false}`; `GET /_demo` shows it unchanged.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::tokens::{demo_jwks, demo_secret};

/// The path of the control endpoint on every data mock.
pub(super) const CONTROL_PATH: &str = "/_demo";

/// The longest `delay_ms` a control request may set (ten minutes).
pub(super) const MAX_DELAY_MS: u64 = 600_000;

/// How many items a list endpoint answers without `?limit=`, and at most.
pub(super) const DEFAULT_LIMIT: usize = 10;

pub(super) const MAX_LIMIT: usize = 100;

pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What one mock serves.
pub(super) enum Mock {
    User,
    Orders,
    Reco,
    Catalog,
    /// The frontend container beside the sidecar: HTML and Server-Sent Events.
    App,
    /// The JWKS document, at this path.
    Jwks(String),
}

impl Mock {
    /// The mock for an upstream of this name, if the demo has one.
    pub(super) fn for_upstream(name: &str) -> Option<Mock> {
        Some(match name {
            "user" => Mock::User,
            "orders" => Mock::Orders,
            "reco" => Mock::Reco,
            "catalog" => Mock::Catalog,
            "app" => Mock::App,
            _ => return None,
        })
    }

    /// A JSON data service: has the control endpoint and the `missing`/`broken` ids.
    pub(super) fn is_data(&self) -> bool {
        matches!(self, Mock::User | Mock::Orders | Mock::Reco | Mock::Catalog)
    }
}

/// One running mock: what it serves, and the failure mode its control endpoint sets.
pub(super) struct MockServer {
    /// The upstream name (`reco`), or `jwks`.
    name: String,
    mock: Mock,
    mode: Mutex<Mode>,
}

impl MockServer {
    pub(super) fn new(name: &str, mock: Mock) -> Self {
        MockServer {
            name: name.to_string(),
            mock,
            mode: Mutex::new(Mode::default()),
        }
    }

    pub(super) fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }
}

/// A data mock's failure mode (all off: normal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Mode {
    /// Answer `503` to every request.
    fail: bool,
    /// Delay every answer by this many milliseconds.
    delay_ms: u64,
    /// Do not answer at all while this is set.
    hang: bool,
}

impl Mode {
    /// The mode a control request's query asks for; what it does not name is off.
    pub(super) fn from_query(query: &str) -> Result<Mode, String> {
        let mut mode = Mode::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "1"));
            let flag = || match value {
                "1" | "true" | "on" | "yes" => Ok(true),
                "0" | "false" | "off" | "no" => Ok(false),
                _ => Err(format!("`{key}={value}`: use {key}=1 or {key}=0")),
            };
            match key {
                "fail" => mode.fail = flag()?,
                "hang" => mode.hang = flag()?,
                "delay_ms" => {
                    mode.delay_ms = value
                        .parse()
                        .ok()
                        .filter(|ms| *ms <= MAX_DELAY_MS)
                        .ok_or_else(|| {
                            format!("`delay_ms={value}`: use a number of milliseconds up to {MAX_DELAY_MS}")
                        })?;
                }
                _ => {
                    return Err(format!(
                    "unknown control `{key}`: use fail=1, delay_ms=N, hang=1, or no query to reset"
                ))
                }
            }
        }
        Ok(mode)
    }

    pub(super) fn to_json(self, mock: &str) -> Value {
        json!({"mock": mock, "fail": self.fail, "delay_ms": self.delay_ms, "hang": self.hang})
    }
}

pub(super) async fn serve(listener: TcpListener, server: Arc<MockServer>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("bff demo: mock accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(&server, &request).await) }
            });
            // A client hanging up mid-answer is nothing to report in a demo.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request to a mock: the control endpoint, else the canned answer in the current mode.
pub(super) async fn handle<B>(server: &MockServer, request: &Request<B>) -> Response<Body> {
    if !server.mock.is_data() {
        return answer(&server.mock, request);
    }
    if request.uri().path() == CONTROL_PATH {
        return control(server, request);
    }
    // Hanging ends when the mode changes, so `POST /_demo` also frees the requests held so far.
    while server.mode().hang {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mode = server.mode();
    if mode.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mode.delay_ms)).await;
    }
    if mode.fail {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("{} is unavailable (demo fail mode; POST {CONTROL_PATH} resets it)", server.name)}),
        );
    }
    answer(&server.mock, request)
}

/// `POST /_demo?…` sets the mode (see the module doc); `GET /_demo` shows it.
pub(super) fn control<B>(server: &MockServer, request: &Request<B>) -> Response<Body> {
    match *request.method() {
        Method::GET => ok(server.mode().to_json(&server.name)),
        Method::POST => match Mode::from_query(request.uri().query().unwrap_or("")) {
            Ok(mode) => {
                server.set_mode(mode);
                ok(mode.to_json(&server.name))
            }
            Err(e) => json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
        },
        _ => json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": format!("use POST {CONTROL_PATH}?… to set the mode, GET {CONTROL_PATH} to see it")}),
        ),
    }
}

/// The canned answers. Every object carries internal fields no policy whitelists, so a `curl`
/// through the sidecar shows them gone. Any id `missing` is a 404 and `broken` a torn JSON body.
pub(super) fn answer<B>(mock: &Mock, request: &Request<B>) -> Response<Body> {
    if request.method() != Method::GET {
        return json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        );
    }
    let decoded: Vec<String> = request
        .uri()
        .path()
        .split('/')
        .skip(1)
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let limit = || limit(request.uri().query().unwrap_or(""));
    let service_token = format!("Bearer {}", demo_secret("USER_SVC_TOKEN"));
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == service_token.as_bytes());

    match (mock, segments.as_slice()) {
        (Mock::User, _) if !authorized => json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong service credential"}),
        ),
        (_, s) if mock.is_data() && s.contains(&"missing") => not_found(),
        (_, s) if mock.is_data() && s.contains(&"broken") => {
            let torn = if matches!(mock, Mock::Orders) {
                "{\"orderId\": "
            } else {
                "{\"id\": "
            };
            reply(StatusCode::OK, "application/json", full(torn))
        }
        (Mock::User, ["users", id]) => ok(user_document(id)),
        (Mock::Orders, ["users", id, "orders"]) => match limit() {
            Ok(n) => {
                ok(json!({"orders": (0..n).map(|i| order_summary(id, i)).collect::<Vec<_>>()}))
            }
            Err(e) => json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
        },
        (Mock::Orders, ["orders", id]) => ok(order_document(id)),
        (Mock::Reco, ["users", _, "recommendations"] | ["products", _, "similar"]) => {
            match limit() {
                Ok(n) => ok(json!({"items": (0..n).map(recommendation).collect::<Vec<_>>()})),
                Err(e) => json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
            }
        }
        (Mock::Catalog, ["products", id]) => ok(product_document(id)),
        (Mock::App, [""]) => reply(StatusCode::OK, "text/html; charset=utf-8", full(APP_PAGE)),
        (Mock::App, ["events"]) => events(),
        (Mock::App, _) => reply(StatusCode::NOT_FOUND, "text/plain", full("not found\n")),
        (Mock::Jwks(path), _) if request.uri().path() == path => ok(demo_jwks()),
        _ => not_found(),
    }
}

/// A list endpoint's `?limit=N`: [`DEFAULT_LIMIT`] without one, an error when it is not a
/// number up to [`MAX_LIMIT`].
pub(super) fn limit(query: &str) -> Result<usize, String> {
    let Some(value) = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="))
    else {
        return Ok(DEFAULT_LIMIT);
    };
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n <= MAX_LIMIT)
        .ok_or_else(|| format!("limit must be a number from 0 to {MAX_LIMIT}"))
}

/// The user service's document: 40 fields, of which a client needs 4 (`userId`,
/// `displayName`, `avatarUrl`, `loyaltyTier`); the other 36 must never leave the sidecar.
pub(super) fn user_document(id: &str) -> Value {
    json!({
        "userId": id,
        "displayName": "Ada Lovelace",
        "avatarUrl": "https://cdn.example.com/avatars/ada.png",
        "loyaltyTier": "gold",
        // Internal from here on.
        "email": "ada.lovelace@example.com",
        "emailVerified": true,
        "phone": "+44 20 7946 0958",
        "phoneVerified": true,
        "dateOfBirth": "1815-12-10",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "currency": "GBP",
        "addresses": [
            {"type": "home", "line1": "12 St James's Square", "city": "London",
             "postcode": "SW1Y 4JH", "country": "GB", "doorCode": "4711"},
            {"type": "work", "line1": "Ockham Park", "city": "Ripley", "postcode": "GU23 6NP",
             "country": "GB", "doorCode": null},
        ],
        "defaultPaymentMethodId": "pm_1NcL8x2eZvKYlo2C",
        "savedCards": [{"brand": "visa", "last4": "4242", "expiry": "2028-07", "fingerprint": "fp_8c1d0e"}],
        "fraudScore": 0.07,
        "fraudReviewStatus": "cleared",
        "riskFlags": ["high_value_buyer"],
        "internalSegmentTag": "seg-whale-eu-2026q2",
        "abTestBuckets": {"checkout-v3": "treatment", "reco-model": "b"},
        "marketingOptIn": false,
        "consent": {"version": "2026-01", "grantedAt": "2026-01-14T09:12:44Z", "ip": "203.0.113.24"},
        "accountStatus": "active",
        "kycStatus": "verified",
        "taxId": "GB987654321",
        "createdAt": "2019-03-02T18:40:11Z",
        "updatedAt": "2026-05-30T07:01:09Z",
        "lastLoginAt": "2026-06-01T06:58:30Z",
        "lastLoginIp": "203.0.113.24",
        "mfaEnabled": true,
        "passwordUpdatedAt": "2025-11-20T21:05:00Z",
        "lifetimeValue": 18_422.9,
        "orderCount": 137,
        "returnRate": 0.04,
        "loyaltyPoints": 12_840,
        "supportTier": "priority",
        "internalNotes": "VIP; goodwill credit issued in March",
        "crmId": "crm-00418823",
        "legacyAccountId": "LA-1843-0007",
        "pushTokens": ["fcm:dK3x9Q7v0:APA91bH"],
    })
}

/// The `i`th order in a user's order list.
pub(super) fn order_summary(user: &str, i: usize) -> Value {
    let statuses = ["shipped", "processing", "delivered", "out_for_delivery"];
    json!({
        "orderId": format!("o-{}", 1001 + i),
        "status": statuses[i % statuses.len()],
        "estimatedDelivery": format!("2026-12-{:02}", 1 + i % 28),
        "itemCount": 1 + i % 4,
        // Internal from here on.
        "customerId": user,
        "customerEmail": "ada.lovelace@example.com",
        "costPrice": 41.5 + i as f64,
        "marginPct": 31.0 - i as f64,
        "warehouseId": format!("wh-eu-{}", 3 + i % 2),
        "carrierAccountId": "dhl-acct-778201",
        "paymentTransactionId": format!("txn_9f2c{:04}", 17 + i),
        "fulfilmentPriority": if i == 0 { "express" } else { "standard" },
        "fraudCheck": {"score": 0.02, "reviewer": null},
    })
}

/// One order, with its items.
pub(super) fn order_document(id: &str) -> Value {
    json!({
        "orderId": id, "status": "shipped", "estimatedDelivery": "2026-12-01",
        "items": [
            {"title": "Analytical Engine, scale model", "sku": "AE-1843", "costPrice": 41.5},
            {"title": "Punched cards, pack of 100", "sku": "PC-100", "costPrice": 3.2},
        ],
        "customerEmail": "ada.lovelace@example.com", "warehouseId": "wh-eu-3",
        "paymentTransactionId": "txn_9f2c0017", "carrierAccountId": "dhl-acct-778201",
    })
}

/// The catalog: product `p-N` is entry N (1-based, wrapping): title and price in cents.
pub(super) const PRODUCTS: [(&str, u32); 8] = [
    ("Analytical Engine, scale model", 12_900),
    ("Difference Engine kit", 4_900),
    ("Brass gear set", 1_900),
    ("Jacquard loom poster", 2_400),
    ("Punched cards, pack of 100", 900),
    ("Arithmometer, 1820 replica", 8_900),
    ("Notes on the Analytical Engine, facsimile", 3_500),
    ("Cogwheel bookends", 5_400),
];

pub(super) fn product(id: &str) -> (&'static str, String) {
    let n = id
        .strip_prefix("p-")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| id.bytes().map(usize::from).sum());
    let (title, cents) = PRODUCTS[n.wrapping_sub(1) % PRODUCTS.len()];
    (title, format!("€{}.{:02}", cents / 100, cents % 100))
}

/// The `i`th recommended product: `p-1`, `p-2`, … (the ids the catalog knows).
pub(super) fn recommendation(i: usize) -> Value {
    let id = format!("p-{}", 1 + i);
    let (title, price) = product(&id);
    json!({
        "productId": id,
        "thumbnailUrl": format!("https://cdn.example.com/p/{id}/thumb.jpg"),
        "title": title,
        "priceFormatted": price,
        // Internal from here on.
        "marginScore": 0.62 - 0.04 * i as f64,
        "score": (97 - 3 * i as i64) as f64 / 100.0,
        "modelVersion": "reco-2026.05",
        "experimentArm": "b",
        "supplierId": format!("sup-{}", 300 + i % 5),
        "stockLevel": 40 + 7 * i,
    })
}

/// One catalog product.
pub(super) fn product_document(id: &str) -> Value {
    let (title, price) = product(id);
    json!({
        "id": id, "title": title, "priceFormatted": price,
        "images": [
            {"url": format!("https://cdn.example.com/p/{id}/front.jpg"), "width": 1200},
            {"url": format!("https://cdn.example.com/p/{id}/side.jpg"), "width": 800},
            {"url": format!("https://cdn.example.com/p/{id}/detail.jpg"), "width": 800},
        ],
        "seller": {"name": "Babbage & Co.", "taxId": "GB123456789", "payoutAccount": "GB29NWBK60161331926819"},
        // Internal from here on.
        "costPrice": 41.5,
        "marginPct": 67.8,
        "supplierId": "sup-301",
        "supplierContractId": "ctr-2026-0042",
        "warehouseId": "wh-eu-3",
        "stockLevel": 57,
        "internalCategoryCode": "HIST-MECH-07",
        "lastRepricedBy": "pricing-bot-3",
    })
}

pub(super) const APP_PAGE: &str = "<!doctype html>\n<title>demo app</title>\n\
<h1>The frontend app</h1>\n<p>Served by the app container; the sidecar passed this request \
through unchanged. Live ticks: <code>curl -N /events</code>.</p>\n";

/// Three Server-Sent Events, one a second, then the end of the stream.
pub(super) fn events() -> Response<Body> {
    let stream = futures::stream::unfold(1u32, |n| async move {
        if n > 3 {
            return None;
        }
        if n > 1 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let event = format!(
            "id: {n}\nevent: tick\ndata: {}\n\n",
            json!({"tick": n, "of": 3})
        );
        Some((Ok(Frame::data(Bytes::from(event))), n + 1))
    });
    let mut response = reply(
        StatusCode::OK,
        "text/event-stream",
        StreamBody::new(stream).boxed_unsync(),
    );
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(super) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

pub(super) fn reply(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(super) fn json_reply(status: StatusCode, body: Value) -> Response<Body> {
    reply(status, "application/json", full(body.to_string()))
}

pub(super) fn ok(body: Value) -> Response<Body> {
    json_reply(StatusCode::OK, body)
}

pub(super) fn not_found() -> Response<Body> {
    json_reply(StatusCode::NOT_FOUND, json!({"error": "not found"}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn json_body(response: Response<Body>) -> Value {
        let bytes = futures::executor::block_on(response.into_body().collect())
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn get(mock: &Mock, uri: &str) -> Response<Body> {
        let request = Request::get(uri)
            .header(AUTHORIZATION, "Bearer demo-user-svc-token")
            .body(())
            .unwrap();
        answer(mock, &request)
    }

    #[test]
    fn user_document_has_forty_fields_four_of_them_public() {
        let user = json_body(get(&Mock::User, "/users/usr_9821"));
        let fields = user.as_object().unwrap();
        assert_eq!(fields.len(), 40, "{:?}", fields.keys().collect::<Vec<_>>());
        assert_eq!(user["userId"], "usr_9821");
        for field in ["displayName", "avatarUrl", "loyaltyTier", "email", "phone"] {
            assert!(user.get(field).is_some(), "{field}");
        }
        for field in ["fraudScore", "internalSegmentTag", "addresses"] {
            assert!(user.get(field).is_some(), "{field}");
        }
        // The machine credential is still required.
        let anonymous = Request::get("/users/usr_9821").body(()).unwrap();
        assert_eq!(
            answer(&Mock::User, &anonymous).status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn lists_respect_limit() {
        let orders = json_body(get(&Mock::Orders, "/users/usr_9821/orders?limit=3"));
        let orders = orders["orders"].as_array().unwrap();
        assert_eq!(orders.len(), 3);
        for field in [
            "orderId",
            "status",
            "estimatedDelivery",
            "itemCount",
            "costPrice",
            "warehouseId",
        ] {
            assert!(orders[0].get(field).is_some(), "{field}");
        }
        let items = json_body(get(&Mock::Reco, "/users/usr_9821/recommendations?limit=6"));
        let items = items["items"].as_array().unwrap();
        assert_eq!(items.len(), 6);
        for field in [
            "productId",
            "thumbnailUrl",
            "title",
            "priceFormatted",
            "marginScore",
        ] {
            assert!(items[0].get(field).is_some(), "{field}");
        }
        let none = json_body(get(&Mock::Reco, "/users/u/recommendations?limit=0"));
        assert_eq!(none["items"], json!([]));
        let unlimited = json_body(get(&Mock::Orders, "/users/u/orders"));
        assert_eq!(unlimited["orders"].as_array().unwrap().len(), DEFAULT_LIMIT);
        for bad in ["limit=x", "limit=-1", "limit=101"] {
            let response = get(&Mock::Orders, &format!("/users/u/orders?{bad}"));
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn catalog_and_order_answers() {
        let product = json_body(get(&Mock::Catalog, "/products/p-1"));
        assert_eq!(product["id"], "p-1");
        assert_eq!(product["title"], "Analytical Engine, scale model");
        assert_eq!(product["priceFormatted"], "€129.00");
        assert!(product["images"][0]["url"].is_string());
        assert!(product["images"][0]["width"].is_number());
        assert_eq!(product["seller"]["name"], "Babbage & Co.");
        assert!(product["seller"]["taxId"].is_string());
        assert!(product.get("costPrice").is_some());
        // Recommendations name products the catalog knows, with the same title.
        let items = json_body(get(&Mock::Reco, "/users/u/recommendations?limit=1"));
        assert_eq!(items["items"][0]["productId"], "p-1");
        assert_eq!(items["items"][0]["title"], product["title"]);

        let order = json_body(get(&Mock::Orders, "/orders/o-1001"));
        assert_eq!(order["orderId"], "o-1001");
        assert!(order["items"][0]["title"].is_string());
        assert_eq!(
            get(&Mock::Orders, "/orders/missing").status(),
            StatusCode::NOT_FOUND
        );
        let torn = get(&Mock::Orders, "/orders/broken");
        assert_eq!(torn.status(), StatusCode::OK);
        let bytes = futures::executor::block_on(torn.into_body().collect())
            .unwrap()
            .to_bytes();
        assert!(serde_json::from_slice::<Value>(&bytes).is_err());
        for mock in [Mock::User, Mock::Orders, Mock::Reco, Mock::Catalog] {
            let response = get(&mock, "/no/such/path");
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
            assert_eq!(json_body(response)["error"], "not found");
        }
    }

    #[test]
    fn control_query_sets_the_whole_mode() {
        assert_eq!(Mode::from_query(""), Ok(Mode::default()));
        assert_eq!(
            Mode::from_query("fail=1&delay_ms=300"),
            Ok(Mode {
                fail: true,
                delay_ms: 300,
                hang: false
            })
        );
        assert_eq!(
            Mode::from_query("hang=1"),
            Ok(Mode {
                hang: true,
                ..Mode::default()
            })
        );
        for bad in [
            "fail=maybe",
            "delay_ms=soon",
            "delay_ms=600001",
            "explode=1",
        ] {
            assert!(Mode::from_query(bad).is_err(), "{bad}");
        }
    }

    /// One HTTP/1.1 exchange with a mock: the status and the body.
    async fn call(address: std::net::SocketAddr, method: &str, target: &str) -> (u16, Value) {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: mock\r\nAuthorization: Bearer demo-user-svc-token\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8(answer).unwrap();
        let status = text[9..12].parse().unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        (status, serde_json::from_str(body).unwrap())
    }

    #[tokio::test]
    async fn control_endpoint_fails_delays_hangs_and_resets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(MockServer::new("reco", Mock::Reco)),
        ));
        let items = "/users/usr_9821/recommendations?limit=2";

        let (status, mode) = call(address, "POST", "/_demo?fail=1").await;
        assert_eq!(status, 200);
        assert_eq!(
            mode,
            json!({"mock": "reco", "fail": true, "delay_ms": 0, "hang": false})
        );
        assert_eq!(call(address, "GET", items).await.0, 503);
        assert_eq!(call(address, "GET", "/_demo").await.1["fail"], true);

        call(address, "POST", "/_demo?fail=1&delay_ms=150").await;
        let started = Instant::now();
        assert_eq!(call(address, "GET", items).await.0, 503);
        assert!(started.elapsed() >= Duration::from_millis(150));

        call(address, "POST", "/_demo?hang=1").await;
        let held = tokio::spawn(async move { call(address, "GET", items).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!held.is_finished(), "a hanging mock answered");
        // Resetting frees the held request, which is then answered normally.
        let (status, mode) = call(address, "POST", "/_demo").await;
        assert_eq!((status, mode["hang"].clone()), (200, json!(false)));
        let (status, body) = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["items"].as_array().unwrap().len(), 2);

        let (status, body) = call(address, "POST", "/_demo?bogus=1").await;
        assert_eq!(status, 400);
        assert!(body["error"].as_str().unwrap().contains("bogus"));
        assert_eq!(call(address, "GET", items).await.0, 200);
    }
}
