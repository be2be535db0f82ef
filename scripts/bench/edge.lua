-- wrk script for scripts/bench.sh's edge figures (issue 13): what every
-- connection sends first. wrk then reads an HTTP response with
-- `Connection: close` and opens the next connection, so a run counts new
-- connections per second exactly as the cps figure does.
--
--   wrk -H 'Connection: close' -s scripts/bench/edge.lua URL -- pp
--     edge-pp: a PROXY protocol v2 header (PROXY command, TCP over IPv4,
--     198.51.100.7:40000 -> 127.0.0.1:443, no TLVs: 28 bytes), then the same
--     `GET / HTTP/1.1` request as cps (Host, Connection: close), in one write.
--   wrk -H 'Connection: close' -s scripts/bench/edge.lua URL -- sni
--     edge-sni: a real TLS 1.3 ClientHello with server_name "bench.test"
--     (316 bytes), the same bytes on every connection. It was captured once
--     from `openssl s_client -connect 127.0.0.1:PORT -servername bench.test`
--     (OpenSSL 3.0.19) by a listener that saved the first TLS record it
--     received. The backend behind the balancer (nginx `stream` with
--     `ssl_preread on` and `return`) reads the ClientHello and answers with a
--     fixed HTTP response, then closes: no handshake is completed, so no TLS
--     server's CPU is in the figure, only the balancers' work.
--
-- wrk parses the first request the script gives (in its first thread's Lua
-- state, before any connection) and exits if it is not HTTP; after that it
-- sends whatever the script returns. So `request` returns a plain HTTP request
-- for that one check and the raw bytes for every connection: a Lua call per
-- connection (a precomputed string), which cps does not make, the same for
-- every target.

local pp2 = "\r\n\r\n\0\r\nQUIT\n" -- the v2 signature
    .. "\x21"                      -- version 2, command PROXY
    .. "\x11"                      -- AF_INET, STREAM
    .. "\x00\x0c"                  -- 12 address bytes follow
    .. "\198\51\100\7"             -- source 198.51.100.7
    .. "\127\0\0\1"                -- destination 127.0.0.1
    .. "\x9c\x40"                  -- source port 40000
    .. "\x01\xbb"                  -- destination port 443

local client_hello_hex =
    "16030101370100013303036cc074887f54525e608468193888468cbe4f7dea7c" ..
    "cdf7b9f6a81eaf6fbf7cf7209d0fdcf94758b85da0a94cc955f63362be2f960b" ..
    "20e5f46d6313716194c46089003e130213031301c02cc030009fcca9cca8ccaa" ..
    "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d" ..
    "009c003d003c0035002f00ff010000ac0000000f000d00000a62656e63682e74" ..
    "657374000b000403000102000a00160014001d0017001e001900180100010101" ..
    "0201030104002300000016000000170000000d002a0028040305030603080708" ..
    "080809080a080b08040805080604010501060103030301030204020502060200" ..
    "2b0009080304030303020301002d00020101003300260024001d00206bfd55dd" ..
    "b873496d68bad6124f8d551c38f5e545406d6a79dc810b9d656b4c59"

local function unhex(h)
    return (h:gsub("..", function(b) return string.char(tonumber(b, 16)) end))
end

local threads = 0 -- in wrk's main Lua state: threads set up so far

function setup(thread)
    threads = threads + 1
    thread:set("edge_checked", threads > 1) -- only the first thread's request is checked
end

local raw, plain

function init(args)
    local mode = args[1]
    plain = wrk.format()
    if mode == "pp" then
        raw = pp2 .. plain
    elseif mode == "sni" then
        raw = unhex(client_hello_hex)
    else
        error("edge.lua: give `-- pp` or `-- sni` after the URL, got " .. tostring(mode))
    end
end

function request()
    if not edge_checked then
        edge_checked = true
        return plain
    end
    return raw
end
