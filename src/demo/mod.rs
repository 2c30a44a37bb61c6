//! `vncbroker demo`: the whole chain on one machine in one command.
//!
//! It starts the built-in VNC server ([`vnc`]) with a random password,
//! registers it as VM 0 owned by a demo user in a fresh SQLite database,
//! serves the broker, and prints a console URL plus ready-to-paste examples
//! for minting more tokens.

pub mod vnc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::path::PathBuf;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::inventory::Credential;
use crate::server::{self, Node};
use crate::service::MintRequest;
use crate::store::Vm;

/// The demo VM's id and its owner's name.
pub const DEMO_VM: i64 = 0;
pub const DEMO_USER: &str = "demo";

fn random_secret(bytes: usize) -> anyhow::Result<String> {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(URL_SAFE_NO_PAD.encode(raw))
}

/// Runs the demo until Ctrl-C or SIGTERM. `data_dir` keeps the database; by
/// default a temporary directory is used and removed at exit.
pub async fn run(mut cfg: Config, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp;
    let dir = match data_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("vncbroker-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    cfg.database = format!("sqlite://{}", dir.join("vncbroker.db").display());

    // The VNC server; 8 characters is all VNC authentication uses.
    let vnc_password: String = random_secret(6)?.chars().take(8).collect();
    let vnc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let vnc_addr = vnc_listener.local_addr()?;
    tokio::spawn(vnc::serve(
        vnc_listener,
        vnc_password.clone(),
        "vncbroker demo".into(),
    ));

    let store = crate::store::open(&cfg.database).await?;
    let user_password = random_secret(12)?;
    if store.user(DEMO_USER).await?.is_none() {
        let pw = user_password.clone();
        let hash = tokio::task::spawn_blocking(move || crate::auth::hash_password(&pw))
            .await?
            .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
        store.add_user(DEMO_USER, &hash, false).await?;
    } else {
        anyhow::bail!(
            "{} already holds a demo database; use a fresh --data-dir",
            dir.display()
        );
    }
    let secrets = server::open_secrets(&cfg, &*store).await?;
    store
        .add_vm(&Vm {
            id: DEMO_VM,
            name: "demo-vm".into(),
            vnc_host: vnc_addr.ip().to_string(),
            vnc_port: vnc_addr.port(),
            vnc_password: Some(secrets.seal(&vnc_password)?),
            owner: DEMO_USER.into(),
            allowed: vec![],
            policy: Default::default(),
            protocol: Default::default(),
        })
        .await?;
    drop(store);

    let node = Node::bind(&cfg).await?;
    // Minted through the same path the APIs use, as the demo user.
    let credential = Credential {
        user: DEMO_USER.into(),
        secret: user_password.clone(),
    };
    let minted = node
        .service
        .mint(&credential, DEMO_VM, MintRequest::default())
        .await?;
    let base = node.public_url.clone();
    println!("listening on {}", node.addr);
    println!(
        "\nvncbroker demo is running (data in {dir}).\n\
         \n  Open the console:   {url}\n  \
         The token is valid for {ttl} s and can be reused; mint another with:\n\
         \n  pyone:\n    python3 -c 'import pyone; print(pyone.OneServer(\"{base}/RPC2\", session=\"{user}:{pw}\").vm.novnctoken({vm})[\"url\"])'\n\
         \n  curl:\n    curl -s -u {user}:{pw} -X POST {base}/api/v1/vms/{vm}/console-tokens\n\
         \n  stock noVNC (vnc.html) takes:  path={path_enc}\n\
         \nPress Ctrl-C to stop.",
        dir = dir.display(),
        url = minted.url,
        ttl = minted.ttl,
        user = DEMO_USER,
        pw = user_password,
        vm = DEMO_VM,
        path_enc = minted.path.replace('?', "%3F").replace('=', "%3D"),
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    node.run(crate::shutdown::terminate()).await
}
