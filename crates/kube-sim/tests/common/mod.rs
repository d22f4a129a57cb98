//! Shared helpers for kube-sim's tests (kube-sim is a labelled stand-in for
//! K3s's Kubernetes API, not Kubernetes): a plain HTTPS client that trusts
//! the stand-in's CA.
#![allow(dead_code)]

use kube_sim::KubeSim;
use serde_json::Value;
use std::time::Duration;

pub struct Http {
    client: reqwest::blocking::Client,
    base: String,
    token: String,
}

pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

impl Http {
    pub fn new(sim: &KubeSim) -> Http {
        let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).unwrap();
        let client = reqwest::blocking::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Http {
            client,
            base: sim.url(),
            token: sim.token().to_string(),
        }
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
        auth: bool,
    ) -> Answer {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(m, format!("{}{path}", self.base));
        if auth {
            req = req.bearer_auth(&self.token);
        }
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let res = req.send().unwrap();
        let status = res.status().as_u16();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        Answer {
            status,
            content_type,
            text: res.text().unwrap(),
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None, None, true)
    }
}

/// The node's condition of this type, as served.
pub fn condition(node: &Value, kind: &str) -> Option<Value> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

pub fn is_running(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
