//! A planner's run: a plan from its model, each step handed to the
//! executor, the whole to the critic, through their public `/agent` API.

use super::*;

impl Engine {
    /// The planner's run: a plan from the model, each step handed to the
    /// executor (one executor session for the whole task), the results
    /// handed to the critic. Each hand-over is recorded before the next.
    pub(crate) async fn planned_run(
        &self,
        state: &mut RunState,
        peers: &PeerClient,
    ) -> Result<String, Failure> {
        let conversation = self.opening_conversation(state).await?;
        let plan = match self.agent_loop(state, conversation, None).await? {
            run::LoopEnd::Answer(plan) => plan,
            // A planner is offered no tools, so none of its calls can wait.
            run::LoopEnd::Paused(_) => {
                return Err(Failure {
                    kind: FailureKind::Internal,
                    code: "internal_error",
                    message: "a planner's run cannot wait for an approval".into(),
                });
            }
        };
        let (mut steps, dropped) = roles::parse_steps(&plan, peers.peers().max_steps);
        if steps.is_empty() {
            steps.push(state.input.clone());
        }
        state.emit(
            "plan",
            json!({"steps": steps, "dropped": dropped}),
            now_ms(),
        );
        self.record_progress(state).await?;

        let mut executor_session: Option<String> = None;
        let mut results = Vec::with_capacity(steps.len());
        for (index, step) in steps.iter().enumerate() {
            state.emit(
                "delegated",
                json!({"role": "executor", "step": index + 1, "message": step, "session_id": executor_session}),
                now_ms(),
            );
            let answer = self
                .delegate(peers, RoleKind::Executor, step, executor_session.as_deref())
                .await?;
            state.tokens_used += answer.tokens_used;
            state.emit(
                "delegate_result",
                json!({
                    "role": "executor",
                    "step": index + 1,
                    "response": answer.response,
                    "session_id": answer.session_id,
                    "run_id": answer.run_id,
                    "tokens_used": answer.tokens_used,
                }),
                now_ms(),
            );
            executor_session = Some(answer.session_id);
            results.push(answer.response);
            self.record_progress(state).await?;
        }

        let numbered = |items: &[String]| {
            items
                .iter()
                .enumerate()
                .map(|(i, item)| format!("{}. {item}", i + 1))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let (plan, results) = (numbered(&steps), numbered(&results));
        let request = format!(
            "Task:\n{}\n\nPlan:\n{plan}\n\nResults:\n{results}",
            state.input
        );
        state.emit(
            "delegated",
            json!({"role": "critic", "message": request}),
            now_ms(),
        );
        let review = self
            .delegate(peers, RoleKind::Critic, &request, None)
            .await?;
        state.tokens_used += review.tokens_used;
        state.emit(
            "delegate_result",
            json!({
                "role": "critic",
                "response": review.response,
                "session_id": review.session_id,
                "run_id": review.run_id,
                "tokens_used": review.tokens_used,
            }),
            now_ms(),
        );
        Ok(format!(
            "Plan:\n{plan}\n\nResults:\n{results}\n\nReview:\n{}",
            review.response
        ))
    }

    pub(crate) async fn delegate(
        &self,
        peers: &PeerClient,
        role: RoleKind,
        message: &str,
        session_id: Option<&str>,
    ) -> Result<roles::PeerAnswer, Failure> {
        tokio::select! {
            answer = peers.ask(role, message, session_id) => answer.map_err(|message| Failure {
                kind: FailureKind::Upstream,
                code: "delegate_error",
                message,
            }),
            () = self.interrupt.cancelled() => Err(interrupted()),
        }
    }
}
