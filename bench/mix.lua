-- wrk script for bench/load.sh: a fixed request mix against POST /api/route.
--
-- Env: HALL_TOKEN (bearer token; empty for the floor), HALL_N (capabilities in the generated
-- set). Per 100 requests: 60 allowed (tenant org.zeta, INTERNAL, last rule of the capability),
-- 20 denied (SECRET: no rule matches), 19 denied by a family guardrail (tenant org.frozen.*),
-- 1 allowed with ?explain=true. See benches/support/generate.rs for why these outcomes hold.
-- Explain is rare on purpose: it is a debugging aid, not the hot path (its trace lists the
-- requested capability's rules and every candidate worker).
-- done() prints one machine-readable line: RESULT req/s p50_us p99_us p999_us non2xx errors.

local token = os.getenv("HALL_TOKEN") or ""
local n = tonumber(os.getenv("HALL_N") or "1000")
local reqs = {}
local counter = 0

local function cap(i)
  return string.format("cap.f%d.c%06d", math.floor(i / 10), i)
end

local function body(c, label, tenant)
  return string.format(
    '{"capability_id":"%s","env":"prod","data_label":"%s","tenant_id":"%s","correlation_id":"bench"}',
    c, label, tenant)
end

init = function(args)
  local headers = { ["Content-Type"] = "application/json" }
  if token ~= "" then
    headers["Authorization"] = "Bearer " .. token
  end
  -- 1000 distinct requests spread over the whole set, same for every thread.
  for k = 0, 999 do
    local i = (k * 7919) % n
    local c = cap(i)
    local slot = k % 100
    local path, b = "/api/route", nil
    if slot >= 60 and slot < 80 then
      b = body(c, "SECRET", "org.zeta")
    elseif slot >= 80 and slot < 99 then
      b = body(c, "INTERNAL", "org.frozen.acme")
    elseif slot == 99 then
      path = "/api/route?explain=true"
      b = body(c, "INTERNAL", "org.zeta")
    else
      b = body(c, "INTERNAL", "org.zeta")
    end
    reqs[#reqs + 1] = wrk.format("POST", path, headers, b)
  end
end

request = function()
  counter = counter + 1
  return reqs[(counter % #reqs) + 1]
end

done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local non2xx = summary.errors.status
  local errs = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %.0f %d %d %d %d %d\n",
    summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    non2xx, errs))
end
