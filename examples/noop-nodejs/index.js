// The latency suite's Node.js no-op (OpenWhisk's shape): returns an empty object.
exports.main = () => ({});
