-- wrk script for bench/webhook_ingest.py: sends the pre-signed fal callbacks of the file
-- named after "--" in order, each once ("once", then the thread stops) or round and round
-- ("wrap", for the baseline, which stores anything); prints one JSON line from done().
-- File format, one request per line, tab-separated:
--   path  request-id  user-id  timestamp  signature  body
local prepared = {}
local total = 0
local sent = 0
local answered = 0
local wrap = false

function init(args)
  wrap = args[2] == "wrap"
  for line in io.lines(args[1]) do
    local f = {}
    for field in string.gmatch(line, "([^\t]+)") do
      f[#f + 1] = field
    end
    local headers = {
      ["Content-Type"] = "application/json",
      ["X-Fal-Webhook-Request-Id"] = f[2],
      ["X-Fal-Webhook-User-Id"] = f[3],
      ["X-Fal-Webhook-Timestamp"] = f[4],
      ["X-Fal-Webhook-Signature"] = f[5],
    }
    prepared[#prepared + 1] = wrk.format("POST", f[1], headers, f[6])
  end
  total = #prepared
end

function request()
  sent = sent + 1
  if wrap then
    return prepared[(sent - 1) % total + 1]
  end
  if sent > total then
    -- only reached on connections still open after the last request left; the thread
    -- stops when the last answer arrives, before these are counted
    return prepared[total]
  end
  return prepared[sent]
end

function response(status, headers, body)
  answered = answered + 1
  if not wrap and answered >= total then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors_status": %d, "errors_connect": %d, ' ..
    '"errors_read": %d, "errors_write": %d, "errors_timeout": %d, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
