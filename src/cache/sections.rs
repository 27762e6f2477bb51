//! A route's answer without its `meta`: each fetch's section in the route's order, as the
//! cache stores it and the pipeline sends it.

use bytes::Bytes;

use crate::policy::Fetch;

/// How one fetch ended.
pub enum Section {
    /// The projected section, serialised.
    Ok(Vec<u8>),
    /// Failed (optional): the section holds the fallback.
    Degraded,
}

/// The sections, in the route's fetch order, as the members of one JSON object without its
/// braces: `"user":{…},"recentOrders":[…]`. Apart from `meta`, so it can be stored as is.
#[derive(Debug, Clone, PartialEq)]
pub struct Sections {
    pub json: Bytes,
    /// Names of the fetches that failed and hold their fallback.
    pub degraded: Vec<String>,
}

impl Sections {
    pub fn new(fetches: &[Fetch], sections: Vec<Section>) -> Sections {
        let mut json = Vec::new();
        let mut degraded = Vec::new();
        for (fetch, section) in fetches.iter().zip(sections) {
            if !json.is_empty() {
                json.push(b',');
            }
            // Fetch names are checked by the loader (`[A-Za-z0-9_]`), so they need no escaping.
            json.push(b'"');
            json.extend_from_slice(fetch.name.as_bytes());
            json.extend_from_slice(b"\":");
            match section {
                Section::Ok(bytes) => json.extend_from_slice(&bytes),
                Section::Degraded => {
                    degraded.push(fetch.name.clone());
                    let fallback = fetch.fallback.as_ref().unwrap_or(&serde_json::Value::Null);
                    // Serialising a `Value` into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut json, fallback);
                }
            }
        }
        Sections {
            json: Bytes::from(json),
            degraded,
        }
    }

    pub fn is_degraded(&self) -> bool {
        !self.degraded.is_empty()
    }
}
