//! A JSON-RPC node on 127.0.0.1 that answers one call, the one agentpay makes: `eth_call` of
//! `authorizationState(address,bytes32)` on a token contract, from a set of used
//! (authorizer, nonce) pairs. It records every call.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Default)]
struct State {
    used: HashSet<(String, String)>,
    calls: Vec<Value>,
}

pub struct ChainEmulator {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl ChainEmulator {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, state).await;
                });
            }
        });
        Self { url, state }
    }

    /// The chain saw this authorization used (settled by someone).
    pub fn mark_used(&self, authorizer: &str, nonce: &str) {
        self.state.lock().unwrap().used.insert((authorizer.to_ascii_lowercase(), nonce.to_ascii_lowercase()));
    }

    pub fn calls(&self) -> Vec<Value> {
        self.state.lock().unwrap().calls.clone()
    }
}

fn answer(state: &Mutex<State>, request: Value) -> Value {
    let mut state = state.lock().unwrap();
    state.calls.push(request.clone());
    let data = request["params"][0]["data"].as_str().unwrap_or_default().to_ascii_lowercase();
    // 0x, the 4-byte selector, the address word, the nonce word.
    if request["method"] != "eth_call" || data.len() != 2 + 8 + 128 || !data.starts_with("0xe94a0102") {
        return json!({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32000, "message": "execution reverted"}});
    }
    let authorizer = format!("0x{}", &data[10 + 24..10 + 64]);
    let nonce = format!("0x{}", &data[10 + 64..]);
    let used = state.used.contains(&(authorizer, nonce));
    json!({"jsonrpc": "2.0", "id": request["id"], "result": format!("0x{:064x}", u8::from(used))})
}

async fn serve(socket: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let text = answer(&state, serde_json::from_slice(&body).unwrap_or(Value::Null)).to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        write.write_all(response.as_bytes()).await?;
        write.flush().await?;
    }
}
