-- Offers milter protocol version 2; the codec test server must refuse it
-- by closing the connection without a negotiation reply (run with -D port=PORT).

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 5, 0.2)
if conn == nil then
    mt.echo("connect failed")
    error("connect failed")
end
local result = mt.negotiate(conn, 2, nil, nil)
if result == nil then
    mt.echo("version 2 was accepted")
    error("version 2 was accepted")
end
mt.echo("refused: " .. tostring(result))
