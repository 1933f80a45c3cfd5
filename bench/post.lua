-- wrk script: POST one chat request per call, streamed answer, the same for every path.
-- Environment: BENCH_PATH (default /v1/chat-messages), BENCH_AUTH (gateway keys, comma-separated, used in turn; the pass-throughs
-- and the upstream ignore them), BENCH_BODY (the JSON body), BENCH_HEADERS (more headers,
-- "Name: value" lines, for a peer such as Portkey that takes its upstream from them).
-- done() prints one JSON line that bench/run.py reads.
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat-messages"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

local keys = {}
for key in string.gmatch(os.getenv("BENCH_AUTH") or "", "[^,]+") do
  keys[#keys + 1] = key
end
if #keys > 0 then
  wrk.headers["Authorization"] = "Bearer " .. keys[1]
end
if #keys > 1 then
  -- Only with several users: a request() function costs wrk a Lua call per request.
  local i = 0
  request = function()
    i = i % #keys + 1
    wrk.headers["Authorization"] = "Bearer " .. keys[i]
    return wrk.format()
  end
end

function done(summary, latency, requests)
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
