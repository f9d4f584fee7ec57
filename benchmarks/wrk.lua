-- wrk script for the benchmark: POST a chat completion (streaming or not) and print the
-- figures as one JSON line that run.py reads. Set by environment:
--   BENCH_STREAM=1      ask for a server-sent-event stream ("stream": true)
--   BENCH_GAP_US=N      upstream gap between events (X-Bench-Gap-Us)
--   BENCH_EVENTS=N      events per stream (X-Bench-Events)
--   BENCH_MODEL=name    the model named in the body
local stream = os.getenv("BENCH_STREAM") == "1"
local model = os.getenv("BENCH_MODEL") or "bench-model"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-benchmark"
wrk.headers["X-Bench-Gap-Us"] = os.getenv("BENCH_GAP_US") or "0"
wrk.headers["X-Bench-Events"] = os.getenv("BENCH_EVENTS") or "100"
-- A realistic body; the model comes after the messages, as the openai client sends it.
wrk.body = '{"messages":[{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Write one short sentence about benchmarks."}],'
  .. '"model":"' .. model .. '","max_tokens":64,"temperature":0.7,"stream":'
  .. (stream and "true" or "false") .. '}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
