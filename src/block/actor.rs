//! The block-node actor: owns a node's lifecycle. Resizes run here, one
//! at a time per node; I/O does not (exports hold the `Arc<Node>`).
//! A restarted node actor takes over the same open node.
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::error::BlockResult;
use super::node::Node;

pub enum NodeMsg {
    Resize(u64, RpcReplyPort<BlockResult<()>>),
    /// Flush before the node goes away.
    Flush(RpcReplyPort<BlockResult<()>>),
    /// Test hook: fail inside the handler.
    Crash,
}

#[derive(Clone)]
pub struct NodeActor;

pub fn registry_name(node: &str) -> String {
    format!("node/{node}")
}

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = Arc<Node>;
    type Arguments = Arc<Node>;

    async fn pre_start(
        &self,
        _myself: ActorRef<NodeMsg>,
        node: Arc<Node>,
    ) -> Result<Arc<Node>, ActorProcessingErr> {
        Ok(node)
    }

    async fn handle(
        &self,
        _myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        node: &mut Arc<Node>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Resize(size, reply) => {
                let _ = reply.send(node.truncate(size).await);
            }
            NodeMsg::Flush(reply) => {
                let _ = reply.send(node.flush().await);
            }
            NodeMsg::Crash => return Err("test hook: node crash requested".into()),
        }
        Ok(())
    }
}

/// How long a caller waits for a node actor that is being restarted.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resizes node `name` through its actor. An actor that fails drops the
/// messages still in its mailbox, and until its supervisor has started
/// it again it is not registered: either way the request is sent again
/// to the restarted actor, so a caller does not see the restart. An
/// actor still missing after a few seconds is an error.
pub async fn resize(name: &str, size: u64) -> Result<BlockResult<()>, String> {
    let deadline = tokio::time::Instant::now() + RESTART_WAIT;
    loop {
        let actor: Option<ActorRef<NodeMsg>> =
            ractor::registry::where_is(registry_name(name)).map(Into::into);
        let failed = match actor {
            Some(a) => match ractor::call!(a, NodeMsg::Resize, size) {
                Ok(r) => return Ok(r),
                Err(e) => format!("internal error: {e}"),
            },
            None => "internal error: node actor missing".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(failed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
