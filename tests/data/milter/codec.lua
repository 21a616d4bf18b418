-- Plays the MTA against the codec test server of
-- tests/test_milter_codec_miltertest.py (run with -D port=PORT).
-- Message 1 is answered with modifications and accept, message 2 with a
-- reply code; the server records what it received for the Python side.

local function check(ok, what)
    if not ok then
        mt.echo("check failed: " .. what)
        error("check failed: " .. what)
    end
end

local function call(result, what)
    if result ~= nil then
        mt.echo("call failed: " .. what .. ": " .. tostring(result))
        error(what .. ": " .. tostring(result))
    end
end

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 5, 0.2)
check(conn ~= nil, "connect")
call(mt.negotiate(conn, nil, nil, nil), "negotiate")
check(mt.test_action(conn, SMFIF_ADDHDRS), "ADDHDRS offered")
check(mt.test_action(conn, SMFIF_QUARANTINE), "QUARANTINE offered")
check(mt.test_option(conn, SMFIP_NR_HDR), "NR_HDR negotiated")

call(mt.macro(conn, SMFIC_CONNECT, "j", "mx.example.org",
              "{daemon_name}", "mx.example.org"), "macro connect")
call(mt.conninfo(conn, "client.example.net", "192.0.2.10"), "conninfo")
call(mt.helo(conn, "client.example.net"), "helo")
call(mt.macro(conn, SMFIC_MAIL, "i", "ABCDEF1234"), "macro mail")
call(mt.mailfrom(conn, "<sender@example.net>", "SIZE=123"), "mailfrom")
call(mt.rcptto(conn, "<rcpt@example.org>"), "rcptto")
call(mt.data(conn), "data")
call(mt.header(conn, "Subject", "hello"), "header subject")
call(mt.header(conn, "X-Spam", "yes"), "header x-spam")
call(mt.eoh(conn), "eoh")
call(mt.bodystring(conn, "Hello world\r\n"), "body")
call(mt.eom(conn), "eom")

check(mt.eom_check(conn, MT_HDRADD, "X-Spam", "Yes"), "X-Spam added")
check(mt.eom_check(conn, MT_HDRINSERT, "X-B", "b0", 0), "X-B inserted at 0")
check(mt.eom_check(conn, MT_HDRCHANGE, "Subject", "[SPAM] hello"), "Subject changed")
check(mt.eom_check(conn, MT_HDRDELETE, "X-Old"), "X-Old deleted")
check(mt.eom_check(conn, MT_RCPTADD, "<added@example.org>"), "recipient added")
check(mt.eom_check(conn, MT_RCPTDELETE, "<rcpt@example.org>"), "recipient deleted")
check(mt.eom_check(conn, MT_BODYCHANGE, "new body\r\n"), "body replaced")
check(mt.eom_check(conn, MT_QUARANTINE, "held for review"), "quarantined")
check(mt.getreply(conn) == SMFIR_ACCEPT, "accepted")

call(mt.mailfrom(conn, "<second@example.net>"), "mailfrom 2")
call(mt.rcptto(conn, "<rcpt2@example.org>"), "rcptto 2")
call(mt.data(conn), "data 2")
call(mt.header(conn, "Subject", "GTUBE"), "header 2")
call(mt.eoh(conn), "eoh 2")
call(mt.bodystring(conn, "spam\r\n"), "body 2")
call(mt.eom(conn), "eom 2")
check(mt.getreply(conn) == SMFIR_REPLYCODE, "reply code")
check(mt.eom_check(conn, MT_SMTPREPLY, "554", "5.7.1", "Gtube pattern"), "reply text")

call(mt.disconnect(conn), "disconnect")
mt.echo("codec script done")
