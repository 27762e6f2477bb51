//! policy::compile::diagnostics: the rule violations found so far, each with the line and
//! column of the value at fault.

use serde_saphyr::Location;

use crate::policy::Diagnostic;

#[derive(Default)]
pub(super) struct Diagnostics(pub(super) Vec<Diagnostic>);

impl Diagnostics {
    pub(super) fn at(&mut self, location: &Location, message: impl Into<String>) {
        self.0.push(Diagnostic {
            line: location.line(),
            column: location.column(),
            message: message.into(),
        });
    }

    /// Keeps the value when `result` is Ok, records the error at `location` otherwise.
    pub(super) fn check<T>(&mut self, location: &Location, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.at(location, message)).ok()
    }
}
