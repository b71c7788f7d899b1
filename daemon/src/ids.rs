//! Ids as people type them: any unique prefix of an experiment, batch or transfer id, in either
//! case (ULIDs are case-insensitive; they are stored upper case), git and docker style; or a
//! unique suffix after `…` (or `...`), as the TUI shows the ids of one batch: made in the same
//! millisecond, they differ only in their last characters.
//!
//! Resolved once, at the edge of each request that takes an id, so every client (ppuctl, the
//! TUI, the SDK, grpcurl) gets the same rules, and everything past the edge (scheduler, events,
//! the audit trail) only ever sees the full id.

use crate::error::{Error, Rejection};
use crate::store::{IdSpace, Store};

/// Length of a ULID in its canonical text form.
pub const ID_LEN: usize = 26;
/// Matching ids listed when a prefix is ambiguous.
const SHOWN: usize = 8;

impl IdSpace {
    fn noun(self) -> &'static str {
        match self {
            IdSpace::Experiment => "experiment",
            IdSpace::Batch => "batch",
            IdSpace::Transfer => "pending transfer",
        }
    }
}

/// The full id that `given` names in `space`; `field` names the request field in errors.
///
/// - an exact id (either case) is itself, even if unknown: a full id that matches nothing is
///   passed on upper-cased, so the caller reports it as before (NOT_FOUND, or an empty stream
///   for a filter);
/// - a prefix matching exactly one id is that id;
/// - a prefix matching several is refused (INVALID_ARGUMENT) listing them;
/// - a prefix matching none is NOT_FOUND naming the prefix;
/// - `…SUFFIX` (or `...SUFFIX`) follows the same rules for the ids ending with `SUFFIX`.
pub fn resolve(store: &Store, space: IdSpace, field: &str, given: &str) -> Result<String, Error> {
    if given.is_empty() {
        return Err(Rejection::invalid(field, "required").into());
    }
    let suffix = given
        .strip_prefix('…')
        .or_else(|| given.strip_prefix("..."))
        .map(str::to_ascii_uppercase);
    let (found, part, verb) = match &suffix {
        Some(s) if s.is_empty() => return Err(Rejection::invalid(field, "nothing after …").into()),
        Some(s) => (
            store.ids_with_suffix(space, s, SHOWN + 1)?,
            s.clone(),
            "ends",
        ),
        None => {
            let prefix = given.to_ascii_uppercase();
            (
                store.ids_with_prefix(space, &prefix, SHOWN + 1)?,
                prefix,
                "starts",
            )
        }
    };
    match found.as_slice() {
        [first, ..] if *first == part => Ok(part),
        [one] => Ok(one.clone()),
        [] if suffix.is_none() && part.len() >= ID_LEN => Ok(part),
        [] => Err(Error::NotFound(format!(
            "{field}: no {} id {verb} with \"{}\"",
            space.noun(),
            suffix.as_deref().unwrap_or(given)
        ))),
        many => {
            let listed = many.iter().take(SHOWN).cloned().collect::<Vec<_>>();
            let more = if many.len() > SHOWN { " and more" } else { "" };
            Err(Rejection::invalid(
                field,
                format!(
                    "\"{given}\" is ambiguous: it {} the {} ids {}{more}; give more characters",
                    if suffix.is_some() { "ends" } else { "starts" },
                    space.noun(),
                    listed.join(", ")
                ),
            )
            .into())
        }
    }
}

/// [`resolve`] for an optional filter: empty stays empty (no filter).
pub fn resolve_filter(
    store: &Store,
    space: IdSpace,
    field: &str,
    given: &str,
) -> Result<String, Error> {
    if given.is_empty() {
        Ok(String::new())
    } else {
        resolve(store, space, field, given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RejectionKind;
    use ppu_proto::v1 as pb;

    fn store_with(ids: &[&str]) -> (tempfile::TempDir, std::sync::Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store
            .write(|w| {
                for id in ids {
                    w.put_experiment(&pb::Experiment {
                        id: (*id).to_owned(),
                        ..Default::default()
                    })?;
                }
                Ok(())
            })
            .unwrap();
        (dir, store)
    }

    const A: &str = "01JQ3Z9A1B2C3D4E5F6G7H8J9K";
    const B: &str = "01JQ3Z9A1B2C3D4E5F6G7H8J9M";
    const C: &str = "01JQ40000000000000000000AA";

    #[test]
    fn a_unique_prefix_in_either_case_resolves_to_the_full_id() {
        let (_dir, store) = store_with(&[A, B, C]);
        let r = |given: &str| resolve(&store, IdSpace::Experiment, "id", given);
        assert_eq!(r(A).unwrap(), A);
        assert_eq!(r(&A.to_lowercase()).unwrap(), A);
        assert_eq!(r("01jq4").unwrap(), C);
        assert_eq!(r("01JQ3Z9A1B2C3D4E5F6G7H8J9m").unwrap(), B);
        // Batches are another id space.
        assert!(matches!(
            resolve(&store, IdSpace::Batch, "id", "01jq4"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn an_ambiguous_prefix_lists_the_matching_ids() {
        let (_dir, store) = store_with(&[A, B, C]);
        let Err(Error::Refused(r)) = resolve(&store, IdSpace::Experiment, "id", "01jq3z") else {
            panic!("ambiguous prefix accepted")
        };
        assert_eq!(r.kind, RejectionKind::Invalid);
        assert_eq!(r.field, "id");
        assert!(r.reason.contains(A) && r.reason.contains(B), "{}", r.reason);
        assert!(!r.reason.contains(C), "{}", r.reason);
        assert!(r.reason.contains("\"01jq3z\" is ambiguous"), "{}", r.reason);
    }

    #[test]
    fn pending_transfers_and_batches_resolve_in_their_own_tables() {
        let (_dir, store) = store_with(&[A]);
        store
            .write(|w| {
                w.put_transfer(&pb::PendingTransfer {
                    id: C.to_owned(),
                    ..Default::default()
                })?;
                w.put_batch(
                    &pb::Batch {
                        id: B.to_owned(),
                        idempotency_key: "k".into(),
                        ..Default::default()
                    },
                    "hash",
                )
            })
            .unwrap();
        assert_eq!(
            resolve(&store, IdSpace::Transfer, "transfer_id", "01jq4").unwrap(),
            C
        );
        assert_eq!(resolve(&store, IdSpace::Batch, "id", "01jq3").unwrap(), B);
        assert_eq!(
            resolve(&store, IdSpace::Experiment, "id", "01jq3").unwrap(),
            A
        );
        let Err(Error::NotFound(m)) = resolve(&store, IdSpace::Transfer, "transfer_id", "01jq3")
        else {
            panic!("an experiment id resolved as a transfer")
        };
        assert_eq!(
            m,
            "transfer_id: no pending transfer id starts with \"01jq3\""
        );
    }

    #[test]
    fn a_unique_suffix_after_an_ellipsis_resolves_as_the_tui_shows_it() {
        const D: &str = "01JQ50000000000000000000XK";
        let (_dir, store) = store_with(&[A, B, C, D]);
        let r = |given: &str| resolve(&store, IdSpace::Experiment, "id", given);
        assert_eq!(r("…h8j9k").unwrap(), A);
        assert_eq!(r("...H8J9M").unwrap(), B);
        assert_eq!(r(&format!("…{C}")).unwrap(), C);
        let Err(Error::Refused(amb)) = r("…k") else {
            panic!("ambiguous suffix accepted")
        };
        assert!(
            amb.reason.contains("ends the experiment ids"),
            "{}",
            amb.reason
        );
        assert!(
            amb.reason.contains(A) && amb.reason.contains(D),
            "{}",
            amb.reason
        );
        let Err(Error::NotFound(m)) = r("…ZZZ") else {
            panic!("unknown suffix resolved")
        };
        assert_eq!(m, "id: no experiment id ends with \"ZZZ\"");
        assert!(matches!(r("…"), Err(Error::Refused(_))));
    }

    #[test]
    fn many_matches_are_cut_short_and_say_so() {
        let ids: Vec<String> = (0..12).map(|i| format!("01JQ5{i:021}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (_dir, store) = store_with(&refs);
        let Err(Error::Refused(r)) = resolve(&store, IdSpace::Experiment, "id", "01JQ5") else {
            panic!("ambiguous prefix accepted")
        };
        assert_eq!(r.reason.matches("01JQ5").count(), SHOWN + 1, "{}", r.reason);
        assert!(r.reason.contains(" and more;"), "{}", r.reason);
    }

    #[test]
    fn no_match_names_the_prefix_and_an_unknown_full_id_passes_through() {
        let (_dir, store) = store_with(&[A]);
        let Err(Error::NotFound(m)) = resolve(&store, IdSpace::Experiment, "id", "01zz") else {
            panic!("unknown prefix resolved")
        };
        assert_eq!(m, "id: no experiment id starts with \"01zz\"");
        let unknown = "01arz3ndektsv4rrffq69g5fav";
        assert_eq!(
            resolve(&store, IdSpace::Experiment, "id", unknown).unwrap(),
            unknown.to_uppercase()
        );
        assert!(matches!(
            resolve(&store, IdSpace::Experiment, "id", ""),
            Err(Error::Refused(_))
        ));
        assert_eq!(
            resolve_filter(&store, IdSpace::Experiment, "experiment_id", "").unwrap(),
            ""
        );
    }
}
