"""Stand-ins for what the services talk to, for tests, benchmarks and the soak: the fake Messages
API speaks the model API's HTTP and SSE, so the real anthropic SDK is exercised against it; the
OTLP collector takes the spans the services export."""
