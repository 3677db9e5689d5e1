//! An SDK interceptor that logs every DynamoDB request leaving the client: operation, items
//! written, and the largest written item (for write-unit arithmetic). For tests and benches.

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub operation: String,
    /// Per written item, the bytes of the item (Put) or of the new values (Update) in the
    /// request body: close to the size DynamoDB bills (attribute names add a little).
    pub written_item_bytes: Vec<usize>,
    pub transactional: bool,
}

impl LoggedRequest {
    /// Write units by DynamoDB's rule: 1 per started KB per item, doubled in a transaction.
    pub fn write_units(&self) -> usize {
        let units: usize = self.written_item_bytes.iter().map(|b| b.div_ceil(1024).max(1)).sum();
        if self.transactional { units * 2 } else { units }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<LoggedRequest>>>);

impl RequestLog {
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut requests) = self.0.lock() {
            requests.clear();
        }
    }

    /// The interceptor to add to a client's config.
    pub fn interceptor(&self) -> RequestLogInterceptor {
        RequestLogInterceptor(self.clone())
    }
}

#[derive(Debug)]
pub struct RequestLogInterceptor(RequestLog);

fn size(value: &Value) -> usize {
    value.to_string().len()
}

impl Intercept for RequestLogInterceptor {
    fn name(&self) -> &'static str {
        "agentpay-request-log"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let request = context.request();
        let operation =
            request.headers().get("x-amz-target").and_then(|t| t.rsplit('.').next()).unwrap_or("?").to_owned();
        let body: Value = request.body().bytes().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
        let values_size = |v: &Value| v.get("ExpressionAttributeValues").map_or(0, size);
        let (written_item_bytes, transactional) = match operation.as_str() {
            "TransactWriteItems" => {
                let items = body["TransactItems"].as_array().cloned().unwrap_or_default();
                let sizes = items
                    .iter()
                    .filter_map(|item| match (item.get("Put"), item.get("Update"), item.get("ConditionCheck")) {
                        (Some(put), _, _) => Some(size(&put["Item"])),
                        (_, Some(update), _) => Some(values_size(update)),
                        // A condition check is billed as a write of the checked item; its size
                        // is not in the request, so it counts as the 1 KB minimum.
                        (_, _, Some(_)) => Some(0),
                        _ => None,
                    })
                    .collect();
                (sizes, true)
            }
            "PutItem" => (vec![size(&body["Item"])], false),
            "UpdateItem" => (vec![values_size(&body)], false),
            "DeleteItem" => (vec![0], false),
            _ => (vec![], false),
        };
        if let Ok(mut requests) = (self.0).0.lock() {
            requests.push(LoggedRequest { operation, written_item_bytes, transactional });
        }
        Ok(())
    }
}
