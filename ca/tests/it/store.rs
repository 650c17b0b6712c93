//! Datastore tests: every case runs against SQLite and PostgreSQL (`<case>::sqlite` and
//! `<case>::postgres`). PostgreSQL comes from `MESHID_TEST_POSTGRES_URL` or a private throwaway
//! cluster (see `common/pg.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "store/fixture.rs"]
mod fixture;

#[path = "store/audit.rs"]
mod audit;
#[path = "store/dump.rs"]
mod dump;
#[path = "store/entries.rs"]
mod entries;
#[path = "store/lifecycle.rs"]
mod lifecycle;
#[path = "store/records.rs"]
mod records;

/// Two tests per case, one per backend, each bounded in time.
macro_rules! on_both_backends {
    ($($module:ident :: $case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                crate::store::fixture::bounded(crate::store::$module::$case(crate::store::fixture::Backend::Sqlite)).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                crate::store::fixture::bounded(crate::store::$module::$case(crate::store::fixture::Backend::Postgres)).await
            }
        }
    )*};
}

on_both_backends! {
    dump::snapshot_and_restore,
    entries::entry_crud,
    entries::entry_already_exists,
    entries::entry_revision_conflict,
    entries::entry_not_found,
    entries::entries_by_parent,
    entries::get_entries_by_ids,
    entries::corrupt_entry_row_is_reported,
    records::join_token_single_use,
    records::join_token_expired,
    records::join_token_unknown_and_duplicate,
    records::join_token_concurrent_use_one_wins,
    records::agents_upsert_and_list,
    records::agent_delete,
    records::agent_renew_is_conditional,
    records::ca_journal,
    records::federations_and_their_bundles,
    records::deliveries_kept_per_agent_and_server,
    audit::every_mutation_is_audited_once,
    audit::failed_mutations_are_not_audited,
    audit::concurrent_appends_keep_one_chain,
    audit::batch_appends_chain_in_order,
    audit::concurrent_appends_from_two_servers,
    audit::verify_pages_through_a_large_log,
    audit::tamper_edited_record,
    audit::tamper_deleted_middle_record,
    audit::tamper_truncated_log,
    audit::tamper_reordered_records,
    audit::tamper_edited_head,
    audit::tamper_deleted_head,
    lifecycle::restart_persistence,
    lifecycle::migrations_idempotent_on_reopen,
    lifecycle::concurrent_open_migrates_once,
    lifecycle::schema_too_new_is_refused,
    lifecycle::a_version_1_database_migrates_its_agents,
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    lifecycle::unsupported_urls_are_refused().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_connections_leave_no_broken_one_behind() {
    fixture::bounded(lifecycle::killed_connections_leave_no_broken_one_behind()).await
}

#[tokio::test]
async fn sqlite_files_are_private() {
    fixture::bounded(lifecycle::sqlite_files_are_private()).await
}

#[tokio::test]
async fn sqlite_missing_directory_is_named() {
    lifecycle::sqlite_missing_directory_is_named().await
}
