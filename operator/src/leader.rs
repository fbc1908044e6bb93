//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): only the holder
//! reconciles; a standby takes over within the lease duration of the holder's loss, and
//! a holder that loses the lease stops reconciling at once.

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use std::future::Future;
use std::time::Duration;

/// Lease name shared by all operator replicas.
pub const LEASE_NAME: &str = "ballast-operator";
/// Lease validity after the last renewal: the longest a standby waits.
pub const LEASE_SECONDS: u64 = 15;
/// Renew this long before expiry.
pub const GRACE_SECONDS: u64 = 5;

/// Runs `work()` while this replica holds the lease; drops it the moment the lease is
/// lost and waits to win it again. Returns only on a fatal lease error.
///
/// # Errors
/// When the lease manager cannot be built.
pub async fn run_as_leader<F, Fut>(
    client: Client,
    namespace: &str,
    identity: &str,
    mut work: F,
) -> Result<(), kube_lease_manager::LeaseManagerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .build()
        .await?;
    let (mut leading, _task) = manager.watch().await;
    loop {
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return Ok(());
            }
        }
        tracing::info!(identity, "acquired the lease: reconciling");
        tokio::select! {
            () = work() => {
                tracing::warn!("controller stopped while leading; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            lost = async {
                loop {
                    if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                        break;
                    }
                }
            } => {
                let () = lost;
                tracing::warn!(identity, "lost the lease: stopped reconciling");
            }
        }
    }
}
