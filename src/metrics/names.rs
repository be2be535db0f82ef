//! Metric names: the user contract (docs/metrics.md).
//!
//! A leaf module: the model and the data path name their histograms with these,
//! and the exporter ([`super::export`]) names everything else, so neither imports
//! the other.

pub const BUILD_INFO: &str = "flowgate_build_info";
pub const CONNECTIONS: &str = "flowgate_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "flowgate_connections_active";
pub const CONNECTIONS_REJECTED: &str = "flowgate_connections_rejected_total";
pub const BACKEND_UP: &str = "flowgate_backend_up";
pub const BACKEND_STATE: &str = "flowgate_backend_state";
pub const BACKEND_ACTIVE: &str = "flowgate_backend_connections_active";
pub const BACKEND_MAX_CONNECTIONS: &str = "flowgate_backend_max_connections";
pub const BACKEND_LOAD_SCORE: &str = "flowgate_backend_load_score";
pub const BACKEND_REPORTED: &str = "flowgate_backend_reported";
pub const LOAD_REPORT_ERRORS: &str = "flowgate_load_report_errors_total";
pub const LOAD_REPORT_AGE: &str = "flowgate_load_report_age_seconds";
pub const POOL_QUEUE_LENGTH: &str = "flowgate_pool_queue_length";
pub const POOL_QUEUE_TIMEOUTS: &str = "flowgate_pool_queue_timeouts_total";
pub const BACKEND_CONNECTIONS: &str = "flowgate_backend_connections_total";
pub const BACKEND_CONNECT_ERRORS: &str = "flowgate_backend_connect_errors_total";
pub const BACKEND_BYTES: &str = "flowgate_backend_bytes_total";
pub const BACKEND_CONNECT_DURATION: &str = "flowgate_backend_connect_duration_seconds";
pub const BACKEND_FIRST_BYTE_DURATION: &str = "flowgate_backend_first_byte_duration_seconds";
pub const SESSION_DURATION: &str = "flowgate_session_duration_seconds";
pub const HEALTH_CHECKS: &str = "flowgate_health_checks_total";
pub const HEALTH_CHECK_DURATION: &str = "flowgate_health_check_duration_seconds";
pub const CONFIG_RELOADS: &str = "flowgate_config_reloads_total";
pub const CONFIG_LAST_RELOAD: &str = "flowgate_config_last_reload_success_timestamp_seconds";
pub const ACCESS_LOG_DROPPED: &str = "flowgate_access_log_dropped_total";
pub const UDP_SESSIONS_ACTIVE: &str = "flowgate_udp_sessions_active";
pub const UDP_SESSIONS: &str = "flowgate_udp_sessions_total";
pub const UDP_DATAGRAMS: &str = "flowgate_udp_datagrams_total";
pub const UDP_BYTES: &str = "flowgate_udp_bytes_total";
pub const UDP_DROPPED: &str = "flowgate_udp_dropped_total";
pub const BACKEND_UDP_SESSIONS_ACTIVE: &str = "flowgate_backend_udp_sessions_active";
pub const BACKEND_UDP_SESSIONS: &str = "flowgate_backend_udp_sessions_total";
pub const HTTP_REQUESTS: &str = "flowgate_http_requests_total";
pub const HTTP_DURATION: &str = "flowgate_http_request_duration_seconds";
pub const HTTP_FIRST_BYTE: &str = "flowgate_http_response_first_byte_seconds";
pub const HTTP_HEAD: &str = "flowgate_http_response_head_seconds";
pub const HTTP_IN_FLIGHT: &str = "flowgate_http_requests_in_flight";
pub const SNI_ROUTED: &str = "flowgate_sni_routed_total";
