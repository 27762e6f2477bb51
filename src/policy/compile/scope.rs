//! policy::compile::scope: what a template may refer to (the route's path parameters, the
//! verified identities the policy has, other fetches' answers), and the `fields` whitelists.

use serde_saphyr::{Location, Spanned};

use super::diagnostics::Diagnostics;
use crate::policy::template::{Template, Var};
use crate::projection::FieldMask;

/// Which verified identities the policy's templates may use.
#[derive(Debug, Clone, Copy)]
pub(super) struct Identities {
    pub(super) jwt: bool,
    pub(super) api_key: bool,
}

impl Identities {
    pub(super) const NONE: Identities = Identities {
        jwt: false,
        api_key: false,
    };

    /// Why `var` has no value under these identities, if it has none.
    pub(super) fn lacks(self, var: &Var) -> Option<String> {
        match var {
            Var::Jwt(claim) if !self.jwt => Some(format!(
                "`{{jwt.{claim}}}` needs a verified token, but the policy has no `auth.jwt`"
            )),
            Var::AuthClient if !self.api_key => Some(
                "`{auth.client}` is the name of the request's API key, but the policy has no `auth.api_key`".into(),
            ),
            _ => None,
        }
    }
}

/// What a route's templates may refer to.
pub(super) struct TemplateScope<'a> {
    /// The route path's parameters; `None` when the path itself is invalid (already reported).
    pub(super) params: Option<&'a [String]>,
    pub(super) identities: Identities,
    /// The route has `auth: none`: no identity is known.
    pub(super) auth_none: bool,
    /// `{fetch.*}` is for the fetches of a `fetch` route; `link_fetches` checks the names.
    pub(super) fetch_vars: bool,
}

pub(super) fn compile_template(
    spec: &Spanned<String>,
    scope: &TemplateScope,
    diags: &mut Diagnostics,
) -> Option<Template> {
    let template = diags.check(&spec.referenced, Template::parse(&spec.value))?;
    for var in template.vars() {
        match (var, scope.params) {
            (Var::Path(p), Some(params)) if !params.contains(p) => diags.at(
                &spec.referenced,
                format!("`{{path.{p}}}` is not a parameter of the route's path"),
            ),
            (Var::Jwt(_) | Var::AuthClient, _) if scope.auth_none => diags.at(
                &spec.referenced,
                format!("`{{{var}}}` has no value on a route with `auth: none`"),
            ),
            (Var::Jwt(_) | Var::AuthClient, _) => {
                if let Some(reason) = scope.identities.lacks(var) {
                    diags.at(&spec.referenced, reason);
                }
            }
            (Var::Fetch { .. }, _) if !scope.fetch_vars => diags.at(
                &spec.referenced,
                format!("`{{{var}}}` takes a value from another fetch's answer, so only the fetches of a `fetch` route can use it, not a `proxy` route"),
            ),
            _ => {}
        }
    }
    Some(template)
}

pub(super) fn compile_fields(
    fields: Option<Spanned<Vec<Spanned<String>>>>,
    owner_at: &Location,
    owner: &str,
    diags: &mut Diagnostics,
) -> Option<FieldMask> {
    let Some(fields) = fields else {
        diags.at(
            owner_at,
            format!("{owner} needs `fields`: the whitelist of what reaches the client"),
        );
        return None;
    };
    if fields.value.is_empty() {
        diags.at(
            &fields.referenced,
            format!("{owner}: `fields` must list at least one field"),
        );
        return None;
    }
    let specs: Vec<&str> = fields.value.iter().map(|f| f.value.as_str()).collect();
    FieldMask::compile(&specs)
        .map_err(|e| {
            // Point at the entry at fault, not at the list.
            let at = fields
                .value
                .iter()
                .find(|f| f.value.trim() == e.field)
                .map_or(fields.referenced, |f| f.referenced);
            diags.at(&at, format!("{owner}: {e}"));
        })
        .ok()
}
