-- wrk script for the peer comparison in bench/load.sh: ONE request, repeated.
--
-- Env: BENCH_PATH (request path), BENCH_BODY_FILE (file holding the JSON body, sent as is),
-- BENCH_TOKEN (bearer token; empty or unset: no Authorization header).
-- done() prints one machine-readable line:
--   RESULT req/s p50_us p99_us p999_us non2xx socket_errors requests
-- (latency from wrk's own histogram, the one `--latency` prints; p99.9 is not in that list).

local path = os.getenv("BENCH_PATH") or "/"
local token = os.getenv("BENCH_TOKEN") or ""
local body_file = os.getenv("BENCH_BODY_FILE")
local req

init = function(args)
  local f = assert(io.open(assert(body_file, "BENCH_BODY_FILE is not set"), "rb"))
  local body = f:read("*a")
  f:close()
  local headers = { ["Content-Type"] = "application/json" }
  if token ~= "" then
    headers["Authorization"] = "Bearer " .. token
  end
  req = wrk.format("POST", path, headers, body)
end

request = function()
  return req
end

done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format("RESULT %.0f %d %d %d %d %d %d\n",
    summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.status, e.connect + e.read + e.write + e.timeout, summary.requests))
end
