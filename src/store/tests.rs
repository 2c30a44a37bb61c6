//! One store test suite, run against every backend.
//!
//! Each test body takes a fresh, empty store; [`backend_tests!`] turns it
//! into one `#[tokio::test]` per backend: `sqlite::NAME` on a temp file and
//! `postgres::NAME` on a database of its own (on the tests' private server,
//! or on `$DATABASE_URL`'s).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::token::hash_token;

/// A fresh store, and whatever must live as long as it (a temp dir).
pub(super) struct Fixture {
    pub store: Arc<dyn Store>,
    /// The store's URL, to open a second handle (another "node").
    pub url: String,
    _keep: Box<dyn Any + Send>,
}

async fn sqlite_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    Fixture {
        store: open(&url).await.unwrap(),
        url,
        _keep: Box::new(dir),
    }
}

async fn postgres_fixture() -> Fixture {
    let db = super::testpg::TestDb::create("store").await;
    Fixture {
        store: open(&db.url).await.unwrap(),
        url: db.url.clone(),
        _keep: Box::new(db),
    }
}

macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::sqlite_fixture().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::postgres_fixture().await).await
                }
            )*
        }
    };
}

backend_tests!(
    a_spice_token_opens_one_main_channel_and_its_channels_join,
    an_exclusive_vm_takes_one_control_session_from_any_node,
    policies_and_audit_are_kept,
    duplicate_token_hash_is_a_conflict,
    redemption_rules,
    single_use_race_has_one_winner,
    revoke_counts_only_live_tokens,
    purge_removes_expired_and_revoked_tokens,
    users_are_stored_and_names_are_unique,
    vms_need_existing_users_and_removal_revokes_their_tokens,
    sessions_are_recorded_listed_and_filtered,
    revocations_are_an_ordered_log,
    revoking_counts_live_sessions_and_covers_every_token_kind,
    changing_a_vm_withdraws_access_in_the_same_transaction,
    removing_a_user_revokes_their_tokens_and_sessions,
    passwords_can_be_changed,
    a_revocation_must_name_what_it_ends,
    a_second_handle_sees_the_same_data,
    purge_sessions_deletes_only_sessions_that_ended_before_the_cutoff,
    ping_answers,
    byte_counts_past_the_column_range_are_kept_at_the_maximum,
    errors_keep_the_database_error_as_their_source,
    orphaned_sessions_of_a_node_are_closed,
    a_reconnect_ticket_reopens_a_dropped_console_once,
    a_reconnect_ticket_is_void_after_a_close_a_revocation_or_a_new_ticket,
    a_ticket_redeemed_while_its_drop_is_recorded_waits_or_opens,
);

fn token(text: &str, vm: i64, expires_at: i64) -> NewToken {
    NewToken {
        policy: Default::default(),
        protocol: Default::default(),
        hash: hash_token(text),
        vm_id: vm,
        target_host: "127.0.0.1".into(),
        target_port: 5900,
        vnc_password: None,
        user_name: "alice".into(),
        created_at: 0,
        expires_at,
        single_use: false,
        caller_session: None,
    }
}

fn single_use(text: &str, vm: i64, expires_at: i64) -> NewToken {
    NewToken {
        policy: Default::default(),
        single_use: true,
        ..token(text, vm, expires_at)
    }
}

async fn redeems(s: &dyn Store, text: &str, now: i64) -> bool {
    s.redeem(&hash_token(text), now).await.unwrap().is_some()
}

/// Revokes a VM's console access; returns how many tokens were live.
async fn revoke_vm(s: &dyn Store, vm: i64) -> u64 {
    s.revoke(&Revocation::vm(vm, Cause::Revoked))
        .await
        .unwrap()
        .tokens
}

fn vm(id: i64, owner: &str, allowed: &[&str]) -> Vm {
    Vm {
        policy: Default::default(),
        protocol: Default::default(),
        id,
        name: format!("vm-{id}"),
        vnc_host: "10.0.0.1".into(),
        vnc_port: 5900 + id as u16,
        vnc_password: None,
        owner: owner.into(),
        allowed: allowed.iter().map(|a| a.to_string()).collect(),
    }
}

fn session(vm_id: i64, user: &str, node: &str, started_at: i64) -> NewSession {
    NewSession {
        resumed_from: None,
        protocol: Default::default(),
        spice_session_id: None,
        view_only: false,
        exclusive: false,
        recording: false,
        token_id: 1,
        vm_id,
        user_name: user.into(),
        client_addr: "127.0.0.1:40000".into(),
        node: node.into(),
        started_at,
    }
}

fn filter(limit: u32) -> SessionFilter {
    SessionFilter {
        limit,
        ..Default::default()
    }
}

async fn duplicate_token_hash_is_a_conflict(f: Fixture) {
    let s = &*f.store;
    let first = s.insert_token(&token("a", 1, 100)).await.unwrap();
    let err = s.insert_token(&token("a", 1, 100)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    // The same hash for another VM is still the same hash.
    let err = s.insert_token(&token("a", 2, 500)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let second = s.insert_token(&token("b", 1, 100)).await.unwrap();
    assert_ne!(first, second);
}

async fn redemption_rules(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    let reusable = NewToken {
        policy: Default::default(),
        target_host: "vnc.example".into(),
        target_port: 65535,
        vnc_password: Some("pw".into()),
        user_name: "bob".into(),
        ..token("reusable", 7, now + 10)
    };
    let reusable_id = s.insert_token(&reusable).await.unwrap();
    s.insert_token(&single_use("once", 7, now + 10))
        .await
        .unwrap();
    s.insert_token(&token("expired", 7, now)).await.unwrap();

    let r = s
        .redeem(&hash_token("reusable"), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r,
        Redemption {
            single_use: false,
            protocol: Default::default(),
            policy: Default::default(),
            token_id: reusable_id,
            vm_id: 7,
            target_host: "vnc.example".into(),
            target_port: 65535,
            vnc_password: Some("pw".into()),
            user_name: "bob".into(),
            expires_at: now + 10,
            caller_session: None,
            revocation_seq: 0,
        }
    );
    // Reusable: again and again until it expires.
    assert!(redeems(s, "reusable", now).await);
    assert!(redeems(s, "reusable", now + 9).await);
    assert!(
        !redeems(s, "reusable", now + 10).await,
        "expired at expires_at"
    );
    // Single-use: once.
    assert!(redeems(s, "once", now).await);
    assert!(!redeems(s, "once", now).await);
    // Expired the moment expires_at is reached.
    assert!(!redeems(s, "expired", now).await);
    assert!(redeems(s, "expired", now - 1).await);
    assert!(!redeems(s, "unknown", now).await);
    // Revoked: only the reusable one could still open a console.
    let done = s.revoke(&Revocation::vm(7, Cause::Revoked)).await.unwrap();
    assert_eq!(done.tokens, 1);
    assert!(!redeems(s, "reusable", now).await);
    assert!(!redeems(s, "expired", now - 1).await);
}

async fn single_use_race_has_one_winner(f: Fixture) {
    let s = Arc::clone(&f.store);
    s.insert_token(&single_use("race", 7, i64::MAX))
        .await
        .unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (s, start) = (Arc::clone(&s), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                s.redeem(&hash_token("race"), 1).await.unwrap().is_some()
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap() as usize;
    }
    assert_eq!(wins, 1);
}

async fn revoke_counts_only_live_tokens(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    s.insert_token(&token("live1", 7, now + 10)).await.unwrap();
    s.insert_token(&token("live2", 7, now + 10)).await.unwrap();
    s.insert_token(&single_use("unused-once", 7, now + 10))
        .await
        .unwrap();
    s.insert_token(&single_use("used-once", 7, now + 10))
        .await
        .unwrap();
    assert!(redeems(s, "used-once", now).await);
    s.insert_token(&token("expired", 7, now)).await.unwrap();
    s.insert_token(&token("other-vm", 8, now + 10))
        .await
        .unwrap();
    // Live: both reusable ones and the unused single-use one. A used
    // single-use token and an expired one are dead already.
    assert_eq!(revoke_vm(s, 7).await, 3);
    assert_eq!(revoke_vm(s, 7).await, 0);
    assert_eq!(revoke_vm(s, 99).await, 0);
    assert!(redeems(s, "other-vm", now).await);
    assert_eq!(revoke_vm(s, 8).await, 1);
    // The used single-use token is revoked too, though it counted as dead.
    assert!(!redeems(s, "used-once", now).await);
}

async fn purge_removes_expired_and_revoked_tokens(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    s.insert_token(&token("expired", 7, now)).await.unwrap();
    s.insert_token(&token("live", 7, now + 10)).await.unwrap();
    s.insert_token(&token("revoked", 8, now + 600))
        .await
        .unwrap();
    s.revoke(&Revocation::vm(8, Cause::Revoked)).await.unwrap();
    assert_eq!(s.purge_expired(now).await.unwrap(), 2);
    assert_eq!(s.purge_expired(now).await.unwrap(), 0);
    assert!(redeems(s, "live", now).await);
    // Revocations live on in the log, which ends sessions, not in the tokens.
    assert_eq!(s.revocations_after(0, 10).await.unwrap().len(), 1);
    // The purged hash can be minted again.
    s.insert_token(&token("expired", 7, now + 5)).await.unwrap();
}

async fn users_are_stored_and_names_are_unique(f: Fixture) {
    let s = &*f.store;
    assert!(s.users().await.unwrap().is_empty());
    assert!(s.user("alice").await.unwrap().is_none());
    let bob = s.add_user("bob", "hash-b", true).await.unwrap();
    let alice = s.add_user("alice", "hash-a", false).await.unwrap();
    assert_ne!(alice, bob);
    let err = s.add_user("bob", "other", false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert!(err.to_string().contains("bob"), "{err}");
    let got = s.user("alice").await.unwrap().unwrap();
    assert_eq!(
        got,
        User {
            id: alice,
            name: "alice".into(),
            password_hash: "hash-a".into(),
            admin: false,
        }
    );
    assert!(s.user("bob").await.unwrap().unwrap().admin);
    assert!(s.user("Alice").await.unwrap().is_none(), "names are exact");
    // Sorted by name, byte-wise.
    s.add_user("Zed", "h", false).await.unwrap();
    let names: Vec<String> = s
        .users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["Zed", "alice", "bob"]);
}

async fn vms_need_existing_users_and_removal_revokes_their_tokens(f: Fixture) {
    let s = &*f.store;
    let mut web = vm(7, "alice", &["carol", "bob"]);
    web.vnc_password = Some("pw".into());
    let err = s.add_vm(&web).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { .. }),
        "unknown owner: {err:?}"
    );
    s.add_user("alice", "h", false).await.unwrap();
    s.add_user("bob", "h", false).await.unwrap();
    let err = s.add_vm(&web).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { .. }),
        "unknown allowed user: {err:?}"
    );
    assert!(s.vm(7).await.unwrap().is_none(), "nothing half-added");
    s.add_user("carol", "h", false).await.unwrap();
    s.add_vm(&web).await.unwrap();
    let err = s.add_vm(&vm(7, "bob", &[])).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let db = vm(3, "bob", &[]);
    s.add_vm(&db).await.unwrap();
    let zero = vm(0, "carol", &["alice", "alice"]);
    s.add_vm(&zero).await.unwrap();

    // Allowed users come back sorted, without duplicates.
    web.allowed = vec!["bob".into(), "carol".into()];
    assert_eq!(s.vm(7).await.unwrap().unwrap(), web);
    let listed = s.vms().await.unwrap();
    assert_eq!(listed.iter().map(|v| v.id).collect::<Vec<_>>(), [0, 3, 7]);
    assert_eq!(listed[0].allowed, ["alice"]);
    assert_eq!(listed[1], db);

    let now = crate::now_unix();
    let id = s.insert_token(&token("t", 7, now + 600)).await.unwrap();
    s.insert_token(&token("t3", 3, now + 600)).await.unwrap();
    s.open_session(&NewSession {
        view_only: false,
        exclusive: false,
        recording: false,
        token_id: id,
        ..session(7, "alice", "n1", now)
    })
    .await
    .unwrap()
    .id()
    .expect("opened");
    let done = s.remove_vm(7).await.unwrap().expect("removed");
    assert_eq!((done.tokens, done.sessions), (1, 1));
    assert!(s.remove_vm(7).await.unwrap().is_none());
    assert!(s.vm(7).await.unwrap().is_none());
    let log = s.revocations_after(0, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].revocation, Revocation::vm(7, Cause::VmRemoved));
    assert!(!redeems(s, "t", now).await);
    assert!(
        redeems(s, "t3", now).await,
        "other VMs' tokens are untouched"
    );
    assert_eq!(s.vms().await.unwrap().len(), 2);
    // The VM's id can be used again.
    s.add_vm(&vm(7, "alice", &[])).await.unwrap();
}

async fn sessions_are_recorded_listed_and_filtered(f: Fixture) {
    let s = &*f.store;
    let a = s
        .open_session(&session(7, "alice", "n1", 10))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let b = s
        .open_session(&session(8, "bob", "n2", 20))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let c = s
        .open_session(&session(7, "bob", "n1", 20))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let big = 5_000_000_000u64;
    s.close_session(
        a,
        &SessionEnd {
            ticket: TicketEnd::NoTicket,
            audit: None,
            recording: None,
            ended_at: 30,
            bytes_to_client: big,
            bytes_to_server: 6,
            reason: "client closed".into(),
        },
    )
    .await
    .unwrap();

    let all = s.sessions(&filter(10)).await.unwrap();
    // Newest first; equal start times by id, newest first.
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [c, b, a]);
    assert_eq!(
        all[2],
        SessionRecord {
            resumed_from: None,
            protocol: Default::default(),
            channels: 1,
            view_only: false,
            key_events: None,
            pointer_events: None,
            clipboard_bytes_to_vm: None,
            clipboard_bytes_from_vm: None,
            recording: false,
            recording_state: None,
            id: a,
            vm_id: 7,
            user: "alice".into(),
            client_addr: "127.0.0.1:40000".into(),
            node: "n1".into(),
            started_at: 10,
            ended_at: Some(30),
            bytes_to_client: big,
            bytes_to_server: 6,
            close_reason: Some("client closed".into()),
        }
    );
    assert_eq!(
        (
            all[0].ended_at,
            all[0].bytes_to_client,
            &all[0].close_reason
        ),
        (None, 0, &None),
        "a live session"
    );
    assert_eq!(all[1].node, "n2");

    let ids = |v: Vec<SessionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let cases: Vec<(SessionFilter, Vec<i64>)> = vec![
        (
            SessionFilter {
                vm_id: Some(7),
                ..filter(10)
            },
            vec![c, a],
        ),
        (
            SessionFilter {
                vm_id: Some(9),
                ..filter(10)
            },
            vec![],
        ),
        (
            SessionFilter {
                user: Some("bob".into()),
                ..filter(10)
            },
            vec![c, b],
        ),
        (
            SessionFilter {
                user: Some("carol".into()),
                ..filter(10)
            },
            vec![],
        ),
        (
            SessionFilter {
                since: Some(11),
                ..filter(10)
            },
            vec![c, b],
        ),
        (
            SessionFilter {
                since: Some(21),
                ..filter(10)
            },
            vec![],
        ),
        (
            SessionFilter {
                vm_id: Some(7),
                user: Some("bob".into()),
                since: Some(20),
                live: false,
                limit: 10,
            },
            vec![c],
        ),
        (filter(2), vec![c, b]),
        (filter(0), vec![]),
    ];
    for (filter, want) in cases {
        assert_eq!(ids(s.sessions(&filter).await.unwrap()), want, "{filter:?}");
    }
    // Closing an unknown session is not an error.
    s.close_session(
        9999,
        &SessionEnd {
            ticket: TicketEnd::NoTicket,
            audit: None,
            recording: None,
            ended_at: 1,
            bytes_to_client: 0,
            bytes_to_server: 0,
            reason: "x".into(),
        },
    )
    .await
    .unwrap();
}

async fn revocations_are_an_ordered_log(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    assert_eq!(s.last_revocation().await.unwrap(), 0);
    s.insert_token(&token("a", 1, now + 100)).await.unwrap();
    let first = s.revoke(&Revocation::vm(1, Cause::Revoked)).await.unwrap();
    let second = s
        .revoke(&Revocation::user("bob", Some(2), Cause::AccessRemoved))
        .await
        .unwrap();
    let one = Revocation {
        vm_id: Some(3),
        user: Some("carol".into()),
        session_id: Some(42),
        cause: Cause::SessionEnded,
    };
    let third = s.revoke(&one).await.unwrap();
    assert!(first.seq < second.seq && second.seq < third.seq);
    assert_eq!(s.last_revocation().await.unwrap(), third.seq);
    let log = s.revocations_after(0, 10).await.unwrap();
    let seqs: Vec<i64> = log.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [first.seq, second.seq, third.seq]);
    assert_eq!(log[0].revocation, Revocation::vm(1, Cause::Revoked));
    assert_eq!(
        log[1].revocation,
        Revocation::user("bob", Some(2), Cause::AccessRemoved)
    );
    assert_eq!(log[2].revocation, one);
    assert_eq!(s.revocations_after(first.seq, 10).await.unwrap().len(), 2);
    assert_eq!(
        s.revocations_after(first.seq, 1).await.unwrap()[0].seq,
        second.seq
    );
    assert!(s.revocations_after(third.seq, 10).await.unwrap().is_empty());
    // A redemption carries the last seq recorded before it.
    s.insert_token(&token("b", 9, now + 100)).await.unwrap();
    let r = s.redeem(&hash_token("b"), now).await.unwrap().unwrap();
    assert_eq!(r.revocation_seq, third.seq);
    // Old entries go with the purge; fresh ones stay.
    assert_eq!(s.purge_revocations(now - 3600).await.unwrap(), 0);
    assert_eq!(s.purge_revocations(now + 10).await.unwrap(), 3);
}

async fn revoking_counts_live_sessions_and_covers_every_token_kind(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    s.insert_token(&single_use("used-once", 7, now + 600))
        .await
        .unwrap();
    let used = s
        .redeem(&hash_token("used-once"), now)
        .await
        .unwrap()
        .unwrap();
    let live = s
        .open_session(&NewSession {
            view_only: false,
            exclusive: false,
            recording: false,
            token_id: used.token_id,
            ..session(7, "alice", "n1", now)
        })
        .await
        .unwrap()
        .id()
        .expect("opened");
    let ended = s
        .open_session(&session(7, "bob", "n2", now))
        .await
        .unwrap()
        .id()
        .expect("opened");
    s.close_session(
        ended,
        &SessionEnd {
            ticket: TicketEnd::NoTicket,
            audit: None,
            recording: None,
            ended_at: now,
            bytes_to_client: 0,
            bytes_to_server: 0,
            reason: "client closed".into(),
        },
    )
    .await
    .unwrap();
    s.open_session(&session(8, "alice", "n1", now))
        .await
        .unwrap()
        .id()
        .expect("opened");
    // The used single-use token opened a live session: the revocation ends
    // it though no token was live.
    let done = s.revoke(&Revocation::vm(7, Cause::Revoked)).await.unwrap();
    assert_eq!((done.tokens, done.sessions), (0, 1));
    let log = s.revocations_after(used.revocation_seq, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert!(log[0].revocation.matches(7, "alice", Some(live)));
    assert!(!log[0].revocation.matches(8, "alice", None));
    // One session: counted, and no token revoked.
    s.insert_token(&token("keeps", 8, now + 600)).await.unwrap();
    let record = s.session(live).await.unwrap().unwrap();
    let done = s.revoke(&Revocation::session(&record)).await.unwrap();
    assert_eq!((done.tokens, done.sessions), (0, 1));
    assert!(redeems(s, "keeps", now).await);
    assert!(s.session(999_999).await.unwrap().is_none());
}

async fn changing_a_vm_withdraws_access_in_the_same_transaction(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    for (name, admin) in [
        ("alice", false),
        ("bob", false),
        ("carol", true),
        ("dave", false),
    ] {
        s.add_user(name, "h", admin).await.unwrap();
    }
    s.add_vm(&vm(7, "alice", &["bob", "carol"])).await.unwrap();
    let mint = |text: &str, user: &str| NewToken {
        policy: Default::default(),
        user_name: user.into(),
        ..token(text, 7, now + 600)
    };
    for (t, u) in [("b", "bob"), ("c", "carol"), ("a", "alice")] {
        s.insert_token(&mint(t, u)).await.unwrap();
    }
    let before = s.last_revocation().await.unwrap();

    // bob and carol leave the list; carol is an admin and keeps access.
    let mut changed = vm(7, "alice", &["dave"]);
    let done = s.update_vm(&changed).await.unwrap().expect("updated");
    assert_eq!(done.tokens, 1);
    assert_eq!(s.vm(7).await.unwrap().unwrap(), changed);
    let log = s.revocations_after(before, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        log[0].revocation,
        Revocation::user("bob", Some(7), Cause::AccessRemoved)
    );
    assert!(!redeems(s, "b", now).await);
    assert!(redeems(s, "c", now).await);
    assert!(redeems(s, "a", now).await);

    // A new owner: the old one goes unless still allowed.
    changed.owner = "dave".into();
    changed.allowed = vec![];
    s.update_vm(&changed).await.unwrap();
    let log = s.revocations_after(before, 10).await.unwrap();
    assert_eq!(
        log[1].revocation,
        Revocation::user("alice", Some(7), Cause::AccessRemoved)
    );
    assert_eq!(log.len(), 2, "dave kept access as owner: {log:?}");

    // A new console ends every session of the VM.
    changed.vnc_port = 6000;
    let done = s.update_vm(&changed).await.unwrap().unwrap();
    assert_eq!(done.tokens, 1, "carol's token");
    let log = s.revocations_after(before, 10).await.unwrap();
    assert_eq!(log[2].revocation, Revocation::vm(7, Cause::VmChanged));

    // Unknown VM or owner.
    assert!(s.update_vm(&vm(99, "alice", &[])).await.unwrap().is_none());
    let err = s.update_vm(&vm(7, "nobody", &[])).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert_eq!(
        s.vm(7).await.unwrap().unwrap(),
        changed,
        "nothing half-done"
    );
}

async fn removing_a_user_revokes_their_tokens_and_sessions(f: Fixture) {
    let s = &*f.store;
    let now = crate::now_unix();
    s.add_user("alice", "h", false).await.unwrap();
    s.add_user("bob", "h", false).await.unwrap();
    s.add_vm(&vm(7, "alice", &["bob"])).await.unwrap();
    s.insert_token(&NewToken {
        policy: Default::default(),
        user_name: "bob".into(),
        ..token("b", 7, now + 600)
    })
    .await
    .unwrap();
    s.open_session(&session(7, "bob", "n1", now))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let err = s.remove_user("alice").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "owner of VM 7: {err:?}"
    );
    let done = s.remove_user("bob").await.unwrap().expect("removed");
    assert_eq!((done.tokens, done.sessions), (1, 1));
    assert!(s.user("bob").await.unwrap().is_none());
    assert!(s.vm(7).await.unwrap().unwrap().allowed.is_empty());
    assert!(!redeems(s, "b", now).await);
    let log = s.revocations_after(0, 10).await.unwrap();
    assert_eq!(
        log[0].revocation,
        Revocation::user("bob", None, Cause::UserRemoved)
    );
    assert!(s.remove_user("bob").await.unwrap().is_none());
}

async fn passwords_can_be_changed(f: Fixture) {
    let s = &*f.store;
    s.add_user("alice", "old", false).await.unwrap();
    assert!(s.set_password("alice", "new").await.unwrap());
    assert_eq!(s.user("alice").await.unwrap().unwrap().password_hash, "new");
    assert!(!s.set_password("nobody", "x").await.unwrap());
}

async fn a_revocation_must_name_what_it_ends(f: Fixture) {
    let s = &*f.store;
    let everything = Revocation {
        vm_id: None,
        user: None,
        session_id: None,
        cause: Cause::Revoked,
    };
    assert!(s.revoke(&everything).await.is_err());
    assert_eq!(s.last_revocation().await.unwrap(), 0);
}

/// Two handles on one database, as two nodes have.
async fn a_second_handle_sees_the_same_data(f: Fixture) {
    let other = open(&f.url).await.unwrap();
    let s = &*f.store;
    s.add_user("alice", "h", true).await.unwrap();
    s.insert_token(&single_use("shared", 1, i64::MAX))
        .await
        .unwrap();
    assert!(other.user("alice").await.unwrap().is_some());
    assert!(
        other
            .redeem(&hash_token("shared"), 1)
            .await
            .unwrap()
            .is_some()
    );
    assert!(s.redeem(&hash_token("shared"), 1).await.unwrap().is_none());
    let err = other.add_user("alice", "h", false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
}

async fn purge_sessions_deletes_only_sessions_that_ended_before_the_cutoff(f: Fixture) {
    let s = &*f.store;
    let ended = |ended_at| SessionEnd {
        ticket: TicketEnd::NoTicket,
        audit: None,
        recording: None,
        ended_at,
        bytes_to_client: 1,
        bytes_to_server: 1,
        reason: "client closed".into(),
    };
    let old = s
        .open_session(&session(1, "alice", "n1", 100))
        .await
        .unwrap()
        .id()
        .expect("opened");
    s.close_session(old, &ended(200)).await.unwrap();
    let ended_late = s
        .open_session(&session(1, "alice", "n1", 100))
        .await
        .unwrap()
        .id()
        .expect("opened");
    s.close_session(ended_late, &ended(600)).await.unwrap();
    let live = s
        .open_session(&session(1, "alice", "n2", 100))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let recent = s
        .open_session(&session(1, "alice", "n2", 700))
        .await
        .unwrap()
        .id()
        .expect("opened");
    s.close_session(recent, &ended(800)).await.unwrap();
    assert_eq!(s.purge_sessions(500).await.unwrap(), 1);
    assert_eq!(s.purge_sessions(500).await.unwrap(), 0);
    let mut left: Vec<i64> = s
        .sessions(&filter(10))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    left.sort();
    assert_eq!(left, vec![ended_late, live, recent]);
}

async fn orphaned_sessions_of_a_node_are_closed(f: Fixture) {
    let s = &*f.store;
    let open = |node: &str| NewSession {
        resumed_from: None,
        protocol: Default::default(),
        spice_session_id: None,
        view_only: false,
        exclusive: false,
        recording: false,
        token_id: 1,
        vm_id: 1,
        user_name: "alice".into(),
        client_addr: "127.0.0.1:1".into(),
        node: node.into(),
        started_at: 10,
    };
    let a = s
        .open_session(&open("a"))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let done = s
        .open_session(&open("a"))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let end = SessionEnd {
        ticket: TicketEnd::NoTicket,
        audit: None,
        recording: None,
        ended_at: 11,
        bytes_to_client: 1,
        bytes_to_server: 2,
        reason: "client closed".into(),
    };
    s.close_session(done, &end).await.unwrap();
    let b = s
        .open_session(&open("b"))
        .await
        .unwrap()
        .id()
        .expect("opened");
    assert_eq!(s.close_orphaned_sessions("a", 50).await.unwrap(), 1);
    assert_eq!(s.close_orphaned_sessions("a", 60).await.unwrap(), 0);
    let all = s
        .sessions(&SessionFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let row = |id| all.iter().find(|r| r.id == id).unwrap();
    assert_eq!(row(a).ended_at, Some(50));
    assert_eq!(row(a).close_reason.as_deref(), Some("node restarted"));
    assert_eq!(row(done).close_reason.as_deref(), Some("client closed"));
    assert_eq!(
        row(b).ended_at,
        None,
        "another node's live session is untouched"
    );
}

async fn ping_answers(f: Fixture) {
    f.store.ping().await.unwrap();
}

/// Both backends store a count too large for a signed column the same way:
/// at the maximum, never wrapped to a negative number that reads as 0.
async fn byte_counts_past_the_column_range_are_kept_at_the_maximum(f: Fixture) {
    let s = &*f.store;
    let id = s
        .open_session(&session(1, "alice", "a", 10))
        .await
        .unwrap()
        .id()
        .expect("opened");
    let end = SessionEnd {
        ticket: TicketEnd::NoTicket,
        audit: None,
        recording: None,
        ended_at: 11,
        bytes_to_client: u64::MAX,
        bytes_to_server: 5,
        reason: "client closed".into(),
    };
    s.close_session(id, &end).await.unwrap();
    let row = s.session(id).await.unwrap().unwrap();
    assert_eq!(row.bytes_to_client, i64::MAX as u64);
    assert_eq!(row.bytes_to_server, 5);
}

/// A store error says what went wrong in the product's words and keeps the
/// database's own error as its source, for logs and for callers that look.
async fn errors_keep_the_database_error_as_their_source(f: Fixture) {
    use std::error::Error as _;
    let s = &*f.store;
    s.add_user("bob", "h", false).await.unwrap();
    let err = s.add_user("bob", "h", false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(err.to_string(), "already exists: user \"bob\"");
    let source = err.source().expect("the database error is kept");
    assert!(
        source.is::<BackendError>(),
        "source is the backend's error: {source:?}"
    );
    let err = s.add_vm(&vm(1, "nobody", &[])).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

// PostgreSQL only: revocation notices between nodes.

/// A revocation on one node wakes the revocation watcher of another at
/// once: with a one-minute tick, only the notice can end the session in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_revocation_notice_ends_sessions_on_another_node() {
    use crate::inventory::Grant;
    use crate::proxy::enforce::watch_revocations;
    use crate::proxy::sessions::{Entry, Sessions, Stop};

    let db = super::testpg::TestDb::create("notify").await;
    let proxy_node = Arc::new(PgStore::open(&db.url).await.unwrap());
    let api_node = open(&db.url).await.unwrap();
    let entry = |vm_id| Entry {
        vm_id,
        user: "alice".into(),
        seen: 0,
        grant: Grant {
            user: "alice".into(),
            host: "127.0.0.1".into(),
            port: 5900,
            protocol: Default::default(),
            caller: None,
        },
    };

    let sessions = Arc::new(Sessions::default());
    let mut revoked = sessions.register(entry(7)).unwrap();
    let untouched = sessions.register(entry(8)).unwrap();
    let store: Arc<dyn Store> = proxy_node.clone();
    let watcher = tokio::spawn(watch_revocations(
        Arc::clone(&sessions),
        store,
        Duration::from_secs(60),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !proxy_node.is_listening() {
        assert!(std::time::Instant::now() < deadline, "LISTEN never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the watcher finish its first (immediate) look and wait on the signal.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = std::time::Instant::now();
    api_node
        .revoke(&Revocation::vm(7, Cause::Revoked))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), revoked.stop.changed())
        .await
        .expect("the session was not ended within 2 s of the revocation")
        .unwrap();
    assert_eq!(*revoked.stop.borrow(), Some(Stop::Revoked(Cause::Revoked)));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(*untouched.stop.borrow(), None);

    // remove_vm notifies as well.
    let mut removed = sessions.register(entry(8)).unwrap();
    api_node.add_user("alice", "h", false).await.unwrap();
    api_node.add_vm(&vm(8, "alice", &[])).await.unwrap();
    assert!(api_node.remove_vm(8).await.unwrap().is_some());
    tokio::time::timeout(Duration::from_secs(2), removed.stop.changed())
        .await
        .expect("the session was not ended within 2 s of the VM's removal")
        .unwrap();
    assert_eq!(
        *removed.stop.borrow(),
        Some(Stop::Revoked(Cause::VmRemoved))
    );
    watcher.abort();
}

/// SQLite has no notices: the watcher relies on its tick alone.
#[tokio::test]
async fn sqlite_has_no_revocation_signal() {
    let f = sqlite_fixture().await;
    assert!(f.store.revocation_signal().is_none());
    let pg = postgres_fixture().await;
    assert!(pg.store.revocation_signal().is_some());
}

async fn an_exclusive_vm_takes_one_control_session_from_any_node(f: Fixture) {
    let s = &*f.store;
    let other = open(&f.url).await.unwrap();
    let control = NewSession {
        exclusive: true,
        ..session(7, "alice", "n1", 10)
    };
    let first = s.open_session(&control).await.unwrap();
    assert!(matches!(first, Opened::Session(_)));
    // Another node, another user: still taken.
    let bob = NewSession {
        user_name: "bob".into(),
        node: "n2".into(),
        ..control.clone()
    };
    assert_eq!(
        other.open_session(&bob).await.unwrap(),
        Opened::ControlTaken
    );
    // Viewers always join; another VM is not concerned.
    let viewer = NewSession {
        view_only: true,
        ..bob.clone()
    };
    assert!(other.open_session(&viewer).await.unwrap().id().is_some());
    let elsewhere = NewSession {
        vm_id: 8,
        ..bob.clone()
    };
    assert!(other.open_session(&elsewhere).await.unwrap().id().is_some());
    // Once the first ends, control is free, and of many nodes racing for
    // it exactly one wins.
    let end = SessionEnd {
        ticket: TicketEnd::NoTicket,
        ended_at: 20,
        bytes_to_client: 0,
        bytes_to_server: 0,
        reason: "client closed".into(),
        audit: None,
        recording: None,
    };
    s.close_session(first.id().unwrap(), &end).await.unwrap();
    let stores: Vec<Arc<dyn Store>> = vec![Arc::clone(&f.store), other];
    let mut racers = Vec::new();
    for i in 0..8 {
        let store = Arc::clone(&stores[i % 2]);
        let open = NewSession {
            node: format!("n{i}"),
            ..control.clone()
        };
        racers.push(tokio::spawn(async move {
            store.open_session(&open).await.unwrap()
        }));
    }
    let mut won = 0;
    for r in racers {
        if r.await.unwrap().id().is_some() {
            won += 1;
        }
    }
    assert_eq!(won, 1, "exactly one control session opens");
}

async fn policies_and_audit_are_kept(f: Fixture) {
    use crate::policy::{Clipboard, Control};
    let s = &*f.store;
    let policy = SessionPolicy {
        view_only: true,
        exclusive: true,
        clipboard: Clipboard::FromVm,
        record: true,
        usb_redirect: true,
        microphone: false,
    };
    s.insert_token(&NewToken {
        policy,
        ..token("policy-token", 7, i64::MAX)
    })
    .await
    .unwrap();
    let r = s
        .redeem(&hash_token("policy-token"), 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.policy, policy);

    s.add_user("alice", "h", false).await.unwrap();
    let mut v = vm(7, "alice", &[]);
    v.policy = VmPolicy {
        control: Some(Control::Exclusive),
        clipboard: None,
        record: Some(false),
        usb_redirect: Some(true),
        microphone: None,
    };
    s.add_vm(&v).await.unwrap();
    assert_eq!(s.vm(7).await.unwrap().unwrap().policy, v.policy);
    v.policy.clipboard = Some(Clipboard::None);
    v.policy.control = None;
    // A new policy is no new console: nothing is revoked.
    assert_eq!(s.update_vm(&v).await.unwrap(), Some(Revoked::default()));
    assert_eq!(s.vm(7).await.unwrap().unwrap().policy, v.policy);

    let recorded = NewSession {
        view_only: true,
        recording: true,
        ..session(7, "alice", "n1", 10)
    };
    let id = s.open_session(&recorded).await.unwrap().id().unwrap();
    let live = s.session(id).await.unwrap().unwrap();
    assert!(live.view_only && live.recording);
    assert_eq!(live.recording_state, Some(RecordingState::Recording));
    assert_eq!(live.key_events, None);
    let audit = Audit {
        key_events: 3,
        pointer_events: 4,
        clipboard_bytes_to_vm: 5,
        clipboard_bytes_from_vm: None,
    };
    s.close_session(
        id,
        &SessionEnd {
            ticket: TicketEnd::NoTicket,
            ended_at: 20,
            bytes_to_client: 1,
            bytes_to_server: 2,
            reason: "client closed".into(),
            audit: Some(audit),
            recording: Some(RecordingState::Complete),
        },
    )
    .await
    .unwrap();
    let done = s.session(id).await.unwrap().unwrap();
    assert_eq!(
        (
            done.key_events,
            done.pointer_events,
            done.clipboard_bytes_to_vm
        ),
        (Some(3), Some(4), Some(5))
    );
    assert_eq!(done.clipboard_bytes_from_vm, None);
    assert_eq!(done.recording_state, Some(RecordingState::Complete));
    // A recording a node left running when it died is incomplete.
    let left = s.open_session(&recorded).await.unwrap().id().unwrap();
    s.close_orphaned_sessions("n1", 30).await.unwrap();
    let orphan = s.session(left).await.unwrap().unwrap();
    assert_eq!(orphan.recording_state, Some(RecordingState::Incomplete));
    // The live filter lists only what is live.
    let live_only = SessionFilter {
        live: true,
        ..filter(10)
    };
    assert!(s.sessions(&live_only).await.unwrap().is_empty());
}

/// A single-use token redeemed into a live session from 127.0.0.1, with the
/// ticket `ticket`: (token id, session id).
async fn ticketed_session(s: &dyn Store, text: &str, ticket: &str, now: i64) -> (i64, i64) {
    let token_id = s
        .insert_token(&single_use(text, 3, now + 600))
        .await
        .unwrap();
    assert!(redeems(s, text, now).await);
    let sid = s
        .open_session(&NewSession {
            token_id,
            ..session(3, "alice", "n1", now)
        })
        .await
        .unwrap()
        .id()
        .unwrap();
    s.set_ticket(&Ticket {
        hash: hash_token(ticket),
        session_id: sid,
        token_id,
        client_ip: "127.0.0.1".into(),
    })
    .await
    .unwrap();
    (token_id, sid)
}

fn ended(at: i64, ticket: TicketEnd) -> SessionEnd {
    SessionEnd {
        ended_at: at,
        bytes_to_client: 0,
        bytes_to_server: 0,
        reason: "client connection lost".into(),
        audit: None,
        recording: None,
        ticket,
    }
}

async fn resume(s: &dyn Store, text: &str, ticket: &str, ip: &str, now: i64) -> Resumed {
    s.resume(&hash_token(text), &hash_token(ticket), ip, now)
        .await
        .unwrap()
}

async fn a_reconnect_ticket_reopens_a_dropped_console_once(f: Fixture) {
    let s = &*f.store;
    let now = 1000;
    let (token_id, sid) = ticketed_session(s, "tok", "tick", now).await;
    let view = s.console(&hash_token("tok"), now).await.unwrap().unwrap();
    assert!(view.single_use);
    assert_eq!(view.token_id, token_id);
    assert_eq!(view.live.len(), 1);
    assert_eq!(view.live[0].id, sid);
    assert!(s.console(&hash_token("nope"), now).await.unwrap().is_none());
    // The used token itself opens nothing more.
    assert!(!redeems(s, "tok", now).await);
    // While the session is live, the ticket waits.
    assert!(matches!(
        resume(s, "tok", "tick", "127.0.0.1", now).await,
        Resumed::Pending
    ));
    s.close_session(sid, &ended(now + 5, TicketEnd::ValidUntil(now + 35)))
        .await
        .unwrap();
    // Another address, another token, another ticket, or past the grace: no.
    for (text, ticket, ip, at) in [
        ("tok", "tick", "127.0.0.2", now + 6),
        ("other", "tick", "127.0.0.1", now + 6),
        ("tok", "tack", "127.0.0.1", now + 6),
        ("tok", "tick", "127.0.0.1", now + 35),
    ] {
        assert!(
            matches!(resume(s, text, ticket, ip, at).await, Resumed::Invalid),
            "{text} {ticket} {ip} {at}"
        );
    }
    match resume(s, "tok", "tick", "127.0.0.1", now + 6).await {
        Resumed::Session { redemption, from } => {
            assert_eq!(from, sid);
            assert_eq!(redemption.token_id, token_id);
            assert_eq!(redemption.vm_id, 3);
            assert!(redemption.single_use);
        }
        other => panic!("not resumed: {other:?}"),
    }
    // Once.
    assert!(matches!(
        resume(s, "tok", "tick", "127.0.0.1", now + 7).await,
        Resumed::Invalid
    ));
    // The next session names the one it continues.
    let next = s
        .open_session(&NewSession {
            token_id,
            resumed_from: Some(sid),
            ..session(3, "alice", "n2", now + 6)
        })
        .await
        .unwrap()
        .id()
        .unwrap();
    let row = s.session(next).await.unwrap().unwrap();
    assert_eq!(row.resumed_from, Some(sid));
    assert_eq!(s.session(sid).await.unwrap().unwrap().resumed_from, None);
}

/// One node records a drop while another redeems its ticket: the client
/// is told to wait or gets its console, never that the ticket is void.
async fn a_ticket_redeemed_while_its_drop_is_recorded_waits_or_opens(f: Fixture) {
    let other = open(&f.url).await.unwrap();
    let now = 1000;
    for round in 0..40 {
        let (text, ticket) = (format!("tok{round}"), format!("tick{round}"));
        let (_, sid) = ticketed_session(&*f.store, &text, &ticket, now).await;
        let closer = Arc::clone(&f.store);
        let drop = tokio::spawn(async move {
            closer
                .close_session(sid, &ended(now + 1, TicketEnd::ValidUntil(now + 30)))
                .await
                .unwrap();
        });
        let mut pending = 0;
        loop {
            match resume(&*other, &text, &ticket, "127.0.0.1", now + 1).await {
                Resumed::Session { from, .. } => {
                    assert_eq!(from, sid);
                    break;
                }
                Resumed::Pending => pending += 1,
                Resumed::Invalid => panic!("round {round}: void after {pending} waits"),
            }
            assert!(pending < 10_000, "round {round}: the drop was never seen");
        }
        drop.await.unwrap();
    }
}

async fn a_reconnect_ticket_is_void_after_a_close_a_revocation_or_a_new_ticket(f: Fixture) {
    let s = &*f.store;
    let now = 1000;
    // Closed for good: the ticket goes with the session.
    let (_, sid) = ticketed_session(s, "closed", "t1", now).await;
    s.close_session(sid, &ended(now + 1, TicketEnd::Void))
        .await
        .unwrap();
    assert!(matches!(
        resume(s, "closed", "t1", "127.0.0.1", now + 2).await,
        Resumed::Invalid
    ));
    // Revoked in the grace.
    let (_, sid) = ticketed_session(s, "revoked", "t2", now).await;
    s.close_session(sid, &ended(now + 1, TicketEnd::ValidUntil(now + 30)))
        .await
        .unwrap();
    revoke_vm(s, 3).await;
    assert!(matches!(
        resume(s, "revoked", "t2", "127.0.0.1", now + 2).await,
        Resumed::Invalid
    ));
    // A new ticket replaces the old one.
    let (token_id, sid) = ticketed_session(s, "renewed", "t3", now).await;
    s.set_ticket(&Ticket {
        hash: hash_token("t4"),
        session_id: sid,
        token_id,
        client_ip: "127.0.0.1".into(),
    })
    .await
    .unwrap();
    s.close_session(sid, &ended(now + 1, TicketEnd::ValidUntil(now + 30)))
        .await
        .unwrap();
    assert!(matches!(
        resume(s, "renewed", "t3", "127.0.0.1", now + 2).await,
        Resumed::Invalid
    ));
    assert!(matches!(
        resume(s, "renewed", "t4", "127.0.0.1", now + 2).await,
        Resumed::Session { .. }
    ));
    // An ended session takes no ticket; a node's orphaned rows lose theirs.
    s.set_ticket(&Ticket {
        hash: hash_token("t5"),
        session_id: sid,
        token_id,
        client_ip: "127.0.0.1".into(),
    })
    .await
    .unwrap();
    assert!(matches!(
        resume(s, "renewed", "t5", "127.0.0.1", now + 2).await,
        Resumed::Invalid
    ));
    let (_, _orphan) = ticketed_session(s, "orphan", "t6", now).await;
    assert!(matches!(
        resume(s, "orphan", "t6", "127.0.0.1", now + 2).await,
        Resumed::Pending
    ));
    s.close_orphaned_sessions("n1", now + 3).await.unwrap();
    assert!(matches!(
        resume(s, "orphan", "t6", "127.0.0.1", now + 4).await,
        Resumed::Invalid
    ));
    // Purging expired tokens takes their tickets too.
    assert!(s.purge_expired(now + 10_000).await.unwrap() > 0);
}

async fn a_spice_token_opens_one_main_channel_and_its_channels_join(f: Fixture) {
    let s = &*f.store;
    let now = 100;
    let spice = |text: &str, single_use: bool| NewToken {
        protocol: Protocol::Spice,
        single_use,
        ..token(text, 7, now + 60)
    };
    let once = s.insert_token(&spice("spice-once", true)).await.unwrap();
    let again = s.insert_token(&spice("spice-again", false)).await.unwrap();
    // A SPICE token is read, not taken, by redemption: every channel of its
    // session redeems it.
    for _ in 0..3 {
        let r = s
            .redeem(&hash_token("spice-once"), now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.token_id, r.protocol), (once, Protocol::Spice));
    }
    // Its one main channel claims it; a second main channel cannot.
    assert!(s.claim_main_channel(once, now).await.unwrap());
    assert!(!s.claim_main_channel(once, now).await.unwrap());
    // A reusable one takes any number of main channels.
    assert!(s.claim_main_channel(again, now).await.unwrap());
    assert!(s.claim_main_channel(again, now).await.unwrap());
    // Not once it expired.
    assert!(!s.claim_main_channel(again, now + 60).await.unwrap());

    let main = s
        .open_session(&NewSession {
            token_id: once,
            protocol: Protocol::Spice,
            spice_session_id: Some(0xdead_beef),
            ..session(7, "alice", "n1", now)
        })
        .await
        .unwrap()
        .id()
        .unwrap();
    // Only that token, with that session id, finds the session.
    assert_eq!(
        s.spice_session(once, 0xdead_beef).await.unwrap(),
        Some(main)
    );
    assert_eq!(s.spice_session(once, 0xdead_bee0).await.unwrap(), None);
    assert_eq!(s.spice_session(again, 0xdead_beef).await.unwrap(), None);
    // Channels count and add their bytes, before and after the main ends.
    s.add_channel(main, true, 0, 0).await.unwrap();
    s.add_channel(main, true, 0, 0).await.unwrap();
    s.add_channel(main, false, 1000, 10).await.unwrap();
    let end = SessionEnd {
        ticket: TicketEnd::Void,
        audit: None,
        recording: None,
        ended_at: now + 5,
        bytes_to_client: 500,
        bytes_to_server: 5,
        reason: "client closed".into(),
    };
    s.close_session(main, &end).await.unwrap();
    s.add_channel(main, false, 1, 1).await.unwrap();
    let row = s.session(main).await.unwrap().unwrap();
    assert_eq!(row.protocol, Protocol::Spice);
    assert_eq!(row.channels, 3);
    assert_eq!((row.bytes_to_client, row.bytes_to_server), (1501, 16));
    // An ended session takes no more channels.
    assert_eq!(s.spice_session(once, 0xdead_beef).await.unwrap(), None);
    // Revoked: not even read.
    s.revoke(&Revocation::vm(7, Cause::Revoked)).await.unwrap();
    assert!(!redeems(s, "spice-once", now).await);

    // A VM's protocol is kept, and changing it is a new console.
    s.add_user("alice", "h", false).await.unwrap();
    let mut v = vm(8, "alice", &[]);
    v.protocol = Protocol::Spice;
    v.policy.usb_redirect = Some(true);
    s.add_vm(&v).await.unwrap();
    assert_eq!(s.vm(8).await.unwrap().unwrap(), v);
    v.protocol = Protocol::Vnc;
    let done = s.update_vm(&v).await.unwrap().unwrap();
    assert!(done.seq > 0, "a protocol change ends the VM's sessions");
    assert_eq!(s.vm(8).await.unwrap().unwrap().protocol, Protocol::Vnc);
}
