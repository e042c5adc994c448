//! A small client of the admin REST API, used by `moeless admin` and by tests.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Errors of an admin call: transport, or an API error with its status and JSON body.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {url} failed: {message}")]
    Transport { url: String, message: String },
    #[error("{status} from {url}: {body}")]
    Api { url: String, status: u16, body: Value },
}

#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `addr` is HOST:PORT (plain HTTP) or a base URL.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_ca(addr, token, None)
    }

    /// With `ca` (a PEM CA certificate, `DIR/ca.pem` of `moeless certs generate`), HTTPS that
    /// trusts only that CA: HOST:PORT means `https://HOST:PORT` (a node started with
    /// `--admin-https`).
    pub fn with_ca(addr: &str, token: Option<String>, ca: Option<&Path>) -> Result<Self, ClientError> {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else if ca.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let transport = |message: String| ClientError::Transport {
            url: base.clone(),
            message,
        };
        let builder = match ca {
            Some(ca) => pki::https::http_client_builder_with_ca(ca).map_err(|e| transport(e.to_string()))?,
            None => pki::https::http_client_builder(),
        };
        let http = builder
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| transport(e.to_string()))?;
        Ok(Self { base, token, http })
    }

    /// Sends `method path` with an optional JSON body; returns the JSON answer (or text as a string).
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |e: reqwest::Error| ClientError::Transport {
            url: url.clone(),
            message: e.to_string(),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transport)?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(value)
        } else {
            Err(ClientError::Api {
                url,
                status: status.as_u16(),
                body: value,
            })
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, path, body).await
    }
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}
