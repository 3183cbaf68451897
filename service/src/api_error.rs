//! Errors as the API answers them: a status and a JSON body naming the
//! documented class, one mapping for every endpoint. Messages are the
//! keeper's, which never carry a secret.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokenkeep_host::Error;

/// A failed request: `{"error": CLASS, "message": TEXT}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub class: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            class: "unauthorized",
            message: "a valid bearer key is required".into(),
        }
    }

    pub fn forbidden(what: &str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            class: "forbidden",
            message: format!("this key may not reach {what}"),
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            class: "body-too-large",
            message: format!("the request body exceeds {limit} bytes"),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            class: "invalid-input",
            message: message.into(),
        }
    }

    pub fn stopping() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            class: "stopping",
            message: "the service is stopping; try another or try again".into(),
        }
    }

    pub fn no_route() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            class: "unknown-endpoint",
            message: "no such endpoint; see /v1/openapi.json".into(),
        }
    }

    pub fn wrong_method() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            class: "method-not-allowed",
            message: "this endpoint does not take that method".into(),
        }
    }
}

/// The status of each class: the caller's fault (4xx) or not (5xx), and
/// for the provider's failures, whether trying again later may help (503).
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::NotFound { .. } | Error::UnknownProvider(_) => StatusCode::NOT_FOUND,
        Error::InvalidInput(_) => StatusCode::BAD_REQUEST,
        // The token's state, not the request, stands in the way.
        Error::ReauthorizationRequired(_) | Error::ScopeMismatch(_) => StatusCode::CONFLICT,
        Error::ProviderUnavailable(_) | Error::LockTimeout | Error::Storage(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::ProviderRejectedClient(_) | Error::InvalidProviderResponse(_) => {
            StatusCode::BAD_GATEWAY
        }
        Error::Decryption(_) | Error::Config(_) | Error::Sandbox(_) | Error::EgressDenied(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self {
            status: status_of(&e),
            class: e.class(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.class, "message": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tokenkeep\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_one_status_and_keeps_its_name() {
        use tokenkeep_core::error::{ErrorClass, RefreshError};
        for class in ErrorClass::ALL {
            let e = Error::from_refresh(RefreshError::of_class(class, "m".into()), "p", "u");
            let api = ApiError::from(e);
            assert_eq!(api.class, class.name());
            assert!(api.status.is_client_error() || api.status.is_server_error());
        }
    }
}
