-- bench/e2e.py's job loop for wrk: run with as many threads as connections, so
-- that each thread's state below is one client's. Each client submits `batch`
-- store jobs (PUT /_api/version, x-arango-async: store), then fetches each
-- result in turn (PUT /_api/job/{id}), 2 ms between looks while it is not
-- there (204), and starts over. Prints one line for bench/e2e.py to read:
--   e2e jobs <results fetched> waits <204 answers> bad <other answers> seconds <s>

local batch = 16
local ids = {}
local submitted = 0
local next_fetch = 1
local waiting = false
local last = nil
local threads = {}
jobs = 0
waits = 0
bad = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  batch = tonumber(args[1] or "16")
end

function delay()
  if waiting then
    return 2
  end
  return 0
end

function request()
  if submitted < batch then
    last = "submit"
    return wrk.format("PUT", "/_api/version", {["x-arango-async"] = "store"})
  end
  last = "fetch"
  return wrk.format("PUT", "/_api/job/" .. ids[next_fetch])
end

local function header(headers, name)
  for key, value in pairs(headers) do
    if string.lower(key) == name then
      return value
    end
  end
  return nil
end

function response(status, headers, body)
  local id = header(headers, "x-arango-async-id")
  if last == "submit" then
    if status ~= 202 or id == nil then
      bad = bad + 1
      return
    end
    submitted = submitted + 1
    ids[submitted] = id
  elseif status == 200 and id == ids[next_fetch] then
    jobs = jobs + 1
    waiting = false
    next_fetch = next_fetch + 1
    if next_fetch > batch then
      submitted = 0
      next_fetch = 1
    end
  elseif status == 204 and id == nil then
    waiting = true
    waits = waits + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local total_jobs, total_waits, total_bad = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_jobs = total_jobs + thread:get("jobs")
    total_waits = total_waits + thread:get("waits")
    total_bad = total_bad + thread:get("bad")
  end
  io.write(string.format("e2e jobs %d waits %d bad %d seconds %.6f\n",
    total_jobs, total_waits, total_bad, summary.duration / 1e6))
end
