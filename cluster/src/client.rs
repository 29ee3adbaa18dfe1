//! The controller's API as a client sees it (the CLI, the CSI driver):
//! one call, tried on each controller in turn until the leader (or, for
//! reads, any controller) answers; while none leads (an election after
//! the leader was lost takes a few seconds), tried again for up to
//! [`ELECTION_WAIT`].

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};

use crate::http::{self, Address, Credentials, HttpError};

/// How long a call waits for a leader to be elected.
pub const ELECTION_WAIT: Duration = Duration::from_secs(20);
/// How long one controller may take to answer (attach waits for engines).
const ANSWER_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller answered with an error status and this message.
    #[error("{message} ({status})")]
    Refused { status: StatusCode, message: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}: the answer is not JSON")]
    NotJson(String),
}

pub struct Client {
    controllers: Vec<Address>,
    credentials: Credentials,
}

impl Client {
    /// `controllers`: the controllers' URLs, comma-separated.
    pub fn new(controllers: &str, credentials: Credentials) -> Result<Client, String> {
        let controllers = controllers
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(|u| u.trim().parse())
            .collect::<Result<Vec<Address>, String>>()?;
        if controllers.is_empty() {
            return Err("no controller URL given".into());
        }
        Ok(Client {
            controllers,
            credentials,
        })
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let deadline = Instant::now() + ELECTION_WAIT;
        loop {
            match self.call_once(method.clone(), path, body.as_ref()).await {
                Err(ClientError::Refused { message, .. })
                    if message.contains("does not lead") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                r => return r,
            }
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut last = None;
        for address in &self.controllers {
            let body = body.map(|b| b.to_string());
            match http::request(
                address,
                method.clone(),
                path,
                body,
                &self.credentials,
                ANSWER_WAIT,
            )
            .await
            {
                Ok(reply) => {
                    return serde_json::from_slice(&reply.body)
                        .map_err(|_| ClientError::NotJson(format!("{address}{path}")))
                }
                Err(HttpError::Status { status, body }) => {
                    let message = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_string))
                        .unwrap_or(body);
                    let not_leader = message.contains("does not lead");
                    last = Some(ClientError::Refused { status, message });
                    if !not_leader {
                        break;
                    }
                }
                Err(e) => last = Some(ClientError::Unreachable(e.to_string())),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Unreachable("no controller".into())))
    }
}
