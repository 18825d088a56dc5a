//! The actor that owns one export: it runs the export's own work
//! (`BlockExport::serve`) and watches it, and it ends the export's
//! service when the export is deleted. If the work dies while the export
//! is still wanted, the actor fails and its supervisor starts it again,
//! which serves the same export anew.
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::BlockExport;
use crate::util::{watched, Watched};

pub enum ExportMsg {
    /// Drop the clients, drain, reply, and stop.
    Shutdown(RpcReplyPort<()>),
    /// The export's work ended (the string says why).
    Ended(String),
    /// Test hook: fail inside the handler.
    Crash,
}

#[derive(Clone)]
pub struct ExportActor;

pub fn registry_name(id: &str) -> String {
    format!("export/{id}")
}

pub struct State {
    export: Arc<dyn BlockExport>,
    closing: bool,
    _work: Watched,
}

impl Actor for ExportActor {
    type Msg = ExportMsg;
    type State = State;
    type Arguments = Arc<dyn BlockExport>;

    async fn pre_start(
        &self,
        myself: ActorRef<ExportMsg>,
        export: Arc<dyn BlockExport>,
    ) -> Result<State, ActorProcessingErr> {
        let work = watched("export", export.clone().serve(), move |why| {
            let _ = myself.cast(ExportMsg::Ended(why));
        });
        Ok(State {
            export,
            closing: false,
            _work: work,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ExportMsg>,
        msg: ExportMsg,
        st: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ExportMsg::Shutdown(reply) => {
                st.closing = true;
                super::shut_down(st.export.as_ref()).await;
                let _ = reply.send(());
                myself.stop(None);
            }
            ExportMsg::Ended(why) if !st.closing => {
                return Err(format!("export '{}': {why}", st.export.id()).into());
            }
            ExportMsg::Ended(_) => {}
            ExportMsg::Crash => return Err("test hook: export crash requested".into()),
        }
        Ok(())
    }
}
