//! `GET /exports/datasets`: what the caller may export. Catalog data only, the same for every
//! tenant: nothing here reads a table or names a tenant.

use super::{require_scope, Deps, ServiceError};
use crate::domain::identity::SCOPE_READ;
use crate::domain::{Dataset, Identity};

/// Every dataset the caller may request, in catalog order; an identity without the read scope
/// may export nothing, so it is refused like any export.
pub fn list<'a>(deps: &'a Deps, who: &Identity) -> Result<Vec<&'a Dataset>, ServiceError> {
    require_scope(who, SCOPE_READ)?;
    Ok(deps.catalog.datasets().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::testing::{fakes, test_config};

    fn who(scopes: &[&str]) -> Identity {
        Identity {
            tenant: "acme".into(),
            user: "alice".into(),
            scopes: scopes
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>(),
        }
    }

    #[test]
    fn readers_see_every_dataset_and_others_none() {
        let f = fakes(test_config(), 1);
        let names: Vec<&str> = list(&f.deps, &who(&[SCOPE_READ]))
            .unwrap()
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, f.deps.catalog.names());
        assert!(matches!(
            list(&f.deps, &who(&[])),
            Err(ServiceError::Forbidden(_))
        ));
    }
}
