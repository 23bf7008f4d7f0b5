// One hop of a chain, in Node.js: counts and stamps the time (benchmarks use it).
// The stamp is CLOCK_MONOTONIC in nanoseconds, as a number (exact below 2^53 ns,
// about 104 days of uptime).
exports.main = (event) => {
  event.n = (event.n || 0) + 1;
  (event.t = event.t || []).push(Number(process.hrtime.bigint()));
  return event;
};
