//! What a run accumulates between two writes to the store: its events,
//! messages and open tool calls, and the channel to a streaming client.

use super::*;

/// A call the model made whose result is not recorded yet.
pub(crate) struct OpenCall {
    pub(crate) call: ToolCall,
    /// Set once the call has been started (and so audited).
    pub(crate) audit_id: Option<String>,
}

/// What a run accumulates between two writes to the store.
pub(crate) struct RunState {
    pub(crate) run_id: String,
    pub(crate) session_id: String,
    /// The agent the run's session belongs to.
    pub(crate) agent: Arc<Agent>,
    /// The user's message that started the run.
    pub(crate) input: String,
    /// The run opened its session: the conversation is its history and
    /// input alone.
    pub(crate) new_session: bool,
    /// The session was named by the client: continued if it exists, made
    /// with that id if not.
    pub(crate) named_session: bool,
    /// What the client says came before `input`, stored if this run makes
    /// the session.
    pub(crate) history: Vec<NewMessage>,
    pub(crate) owner: Option<String>,
    pub(crate) account: Option<Box<dyn RunAccount>>,
    pub(crate) streaming: bool,
    pub(crate) seq: i64,
    pub(crate) steps: i64,
    pub(crate) tokens_used: i64,
    /// What the model's calls took in and gave out, as they reported it.
    pub(crate) input_tokens: i64,
    pub(crate) output_tokens: i64,
    pub(crate) pending_events: Vec<NewEvent>,
    pub(crate) pending_messages: Vec<NewMessage>,
    /// The current step's calls still without a result, in order.
    pub(crate) open_calls: Vec<OpenCall>,
    pub(crate) sender: Option<mpsc::UnboundedSender<EventRecord>>,
    pub(crate) receiver: Option<mpsc::UnboundedReceiver<EventRecord>>,
    /// The run's live feed while its task runs in this process: every
    /// event, for whoever follows the run (see `feeds.rs`).
    pub(crate) feed: Option<Arc<feeds::RunFeed>>,
    /// Cancels this run alone (a client's cancel), or every run (shutdown
    /// past the grace): a child of the engine's interrupt.
    pub(crate) cancel: CancellationToken,
}

impl RunState {
    pub(crate) fn new(
        run_id: String,
        session_id: String,
        streaming: bool,
        agent: Arc<Agent>,
    ) -> RunState {
        let (sender, receiver) = if streaming {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        RunState {
            run_id,
            session_id,
            agent,
            input: String::new(),
            new_session: false,
            named_session: false,
            history: Vec::new(),
            owner: None,
            account: None,
            streaming,
            seq: 0,
            steps: 0,
            tokens_used: 0,
            input_tokens: 0,
            output_tokens: 0,
            pending_events: Vec::new(),
            pending_messages: Vec::new(),
            open_calls: Vec::new(),
            sender,
            receiver,
            feed: None,
            cancel: CancellationToken::new(),
        }
    }

    /// Attaches the run's live feed, whose token cancels the run.
    pub(crate) fn attach_feed(&mut self, feed: Arc<feeds::RunFeed>) {
        self.cancel = feed.cancel.clone();
        self.feed = Some(feed);
    }

    /// Why the run is being stopped: a client's cancel, or shutdown.
    pub(crate) fn interruption(&self) -> Failure {
        match self.feed.as_ref().and_then(|feed| feed.cancel_reason()) {
            Some(reason) => Failure {
                kind: FailureKind::Interrupted,
                code: "run_cancelled",
                message: reason.to_string(),
            },
            None => interrupted(),
        }
    }

    pub(crate) fn take_receiver(&mut self) -> Option<mpsc::UnboundedReceiver<EventRecord>> {
        self.receiver.take()
    }

    /// Numbers an event, queues it for the store and hands it to the client.
    pub(crate) fn emit(&mut self, kind: &'static str, data: Value, now: i64) {
        let event = self.next_event(kind, data, now);
        self.pending_events.push(event);
    }

    /// Numbers an event and hands it to the client.
    pub(crate) fn next_event(&mut self, kind: &'static str, data: Value, now: i64) -> NewEvent {
        self.seq += 1;
        let data = data.to_string();
        if self.sender.is_some() || self.feed.is_some() {
            let record = EventRecord {
                seq: self.seq,
                kind,
                data: Arc::from(data.as_str()),
            };
            if let Some(feed) = &self.feed {
                feed.push(record.clone());
            }
            if let Some(sender) = &self.sender {
                // A client that went away does not stop the run.
                let _ = sender.send(record);
            }
        }
        NewEvent {
            seq: self.seq,
            kind,
            data,
            created_at: now,
        }
    }

    /// Gives every call the run leaves unanswered a result saying so. The
    /// whole history goes to the model with each later message, and strict
    /// endpoints refuse one in which a call has no result: without this, one
    /// interrupted call would make every later message of the session fail.
    pub(crate) fn answer_open_calls(&mut self, failure: &Failure, now: i64) {
        for OpenCall { call, audit_id } in std::mem::take(&mut self.open_calls) {
            let content = match (&audit_id, &failure.kind) {
                (Some(_), FailureKind::Interrupted) => {
                    "error: interrupted before it finished: the server shut down during the call"
                        .to_string()
                }
                (Some(_), _) => {
                    format!("error: interrupted before it finished: {}", failure.message)
                }
                (None, _) => format!(
                    "error: not run: the run ended before this call started ({})",
                    failure.message
                ),
            };
            self.emit(
                "tool_result",
                json!({
                    "id": call.id,
                    "name": call.function.name,
                    "content": content,
                    "is_error": true,
                    "audit_id": audit_id,
                }),
                now,
            );
            self.pending_messages.push(NewMessage {
                role: "tool",
                content: Some(content),
                tool_calls: None,
                tool_call_id: Some(call.id),
            });
        }
    }

    pub(crate) fn progress(&self, now: i64) -> RunProgress<'_> {
        RunProgress {
            run_id: &self.run_id,
            session_id: &self.session_id,
            messages: &self.pending_messages,
            events: &self.pending_events,
            tokens_used: self.tokens_used,
            steps: self.steps,
            now,
        }
    }
}
