-- wrk script for bench/scoring.py: POST the file named by $EDGEPACK_BENCH_BODY as a JSON body,
-- and print one JSON line with the run's figures (latencies in microseconds).
--   EDGEPACK_BENCH_BODY=body.json wrk -c1 -t1 -d5s -s wrk_post.lua http://127.0.0.1:8890/score
-- The body is set at load time (not in a request() hook) so that wrk sends one prebuilt
-- request without calling into Lua per request: the client's overhead stays small.

local f = assert(io.open(assert(os.getenv("EDGEPACK_BENCH_BODY"), "set EDGEPACK_BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"mean_us":%.1f,"max_us":%d,"errors_connect":%d,"errors_read":%d,"errors_write":%d,' ..
      '"errors_status":%d,"errors_timeout":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
