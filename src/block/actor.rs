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
