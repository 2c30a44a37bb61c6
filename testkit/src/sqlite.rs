//! The broker's session log, read straight from its SQLite database.

use std::path::Path;
use std::time::Duration;

/// One row of the `sessions` table.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: i64,
    pub token_id: Option<i64>,
    pub vm_id: i64,
    pub user_name: String,
    pub client_addr: String,
    pub node: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub bytes_to_client: i64,
    pub bytes_to_server: i64,
    pub close_reason: Option<String>,
    /// The session this one continues, reopened with a reconnect ticket.
    pub resumed_from: Option<i64>,
}

/// All rows of the `sessions` table of an SQLite database, oldest first.
pub fn sqlite_session_rows(path: &Path) -> Vec<SessionRow> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening the database read-only");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut st = conn
        .prepare(
            "SELECT id, token_id, vm_id, user_name, client_addr, node, started_at, ended_at,
                    bytes_to_client, bytes_to_server, close_reason, resumed_from
               FROM sessions ORDER BY id",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(SessionRow {
            id: r.get(0)?,
            token_id: r.get(1)?,
            vm_id: r.get(2)?,
            user_name: r.get(3)?,
            client_addr: r.get(4)?,
            node: r.get(5)?,
            started_at: r.get(6)?,
            ended_at: r.get(7)?,
            bytes_to_client: r.get(8)?,
            bytes_to_server: r.get(9)?,
            close_reason: r.get(10)?,
            resumed_from: r.get(11)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}
