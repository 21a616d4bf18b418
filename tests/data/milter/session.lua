-- Plays an MTA against rspamd-tx's milter listener with a fake scanner
-- (tests/test_milter_miltertest.py; run with -D port=PORT).  The fake scanner
-- picks its result by the message's Subject; one connection carries every
-- message, one of them aborted half-way.

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

-- Envelope, headers and body of one message, up to (not including) eom.
local function message(conn, queue_id, subject, extra)
    call(mt.macro(conn, SMFIC_MAIL, "i", queue_id), "macro " .. subject)
    call(mt.mailfrom(conn, "<sender@example.net>"), "mailfrom " .. subject)
    call(mt.rcptto(conn, "<rcpt@example.org>"), "rcptto " .. subject)
    call(mt.data(conn), "data " .. subject)
    call(mt.header(conn, "Subject", subject), "header " .. subject)
    for name, value in pairs(extra or {}) do
        call(mt.header(conn, name, value), "header " .. name)
    end
    call(mt.eoh(conn), "eoh " .. subject)
    call(mt.bodystring(conn, "body of " .. subject .. "\r\n"), "body " .. subject)
end

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 5, 0.2)
check(conn ~= nil, "connect")
mt.set_timeout(3)
call(mt.negotiate(conn, nil, nil, nil), "negotiate")
check(mt.test_action(conn, SMFIF_CHGBODY), "CHGBODY offered")
check(mt.test_action(conn, SMFIF_QUARANTINE), "QUARANTINE offered")
check(mt.test_option(conn, SMFIP_NR_HDR), "NR_HDR negotiated")

call(mt.macro(conn, SMFIC_CONNECT, "j", "mx.example.org",
              "{daemon_name}", "mx.example.org"), "macro connect")
call(mt.conninfo(conn, "client.example.net", "192.0.2.10"), "conninfo")
call(mt.helo(conn, "client.example.net"), "helo")

-- 1: add header plus every modification of the milter block
message(conn, "QID1", "modify", {["X-Old"] = "1", ["X-Spam"] = "maybe"})
call(mt.eom(conn), "eom modify")
check(mt.getreply(conn) == SMFIR_ACCEPT, "modify accepted")
check(mt.eom_check(conn, MT_HDRINSERT, "X-Added", "first", 0), "X-Added inserted at 0")
check(mt.eom_check(conn, MT_HDRDELETE, "X-Old"), "X-Old deleted")
check(mt.eom_check(conn, MT_HDRCHANGE, "X-Spam", "Yes"), "X-Spam set")
check(mt.eom_check(conn, MT_RCPTADD, "<bcc@example.org>"), "recipient added")
check(mt.eom_check(conn, MT_RCPTDELETE, "<rcpt@example.org>"), "recipient deleted")
check(mt.eom_check(conn, MT_BODYCHANGE, "replaced body\r\n"), "body replaced")

-- 2: reject with the scanner's SMTP message
message(conn, "QID2", "reject")
call(mt.eom(conn), "eom reject")
check(mt.getreply(conn) == SMFIR_REPLYCODE, "reject reply code")
check(mt.eom_check(conn, MT_SMTPREPLY, "554", "5.7.1", "Gtube pattern"), "reject text")

-- 3: aborted before the end of the message; never scanned
message(conn, "QID3", "aborted")
call(mt.abort(conn), "abort")

-- 4: soft reject
message(conn, "QID4", "soft")
call(mt.eom(conn), "eom soft")
check(mt.getreply(conn) == SMFIR_REPLYCODE, "soft reject reply code")
check(mt.eom_check(conn, MT_SMTPREPLY, "451", "4.7.1", "Try again later"), "soft reject text")

-- 5: discard
message(conn, "QID5", "discard")
call(mt.eom(conn), "eom discard")
check(mt.getreply(conn) == SMFIR_DISCARD, "discarded")

-- 6: quarantine
message(conn, "QID6", "quarantine")
call(mt.eom(conn), "eom quarantine")
check(mt.getreply(conn) == SMFIR_ACCEPT, "quarantine accepted")
check(mt.eom_check(conn, MT_QUARANTINE, "Spam message quarantined"), "quarantined")

-- 7: a slow scan: progress replies keep miltertest's 3 s timeout from firing
message(conn, "QID7", "slow")
call(mt.eom(conn), "eom slow")
check(mt.getreply(conn) == SMFIR_ACCEPT, "slow accepted")

-- 8: the scanner fails: the failure policy's tempfail
message(conn, "QID8", "fail")
call(mt.eom(conn), "eom fail")
check(mt.getreply(conn) == SMFIR_TEMPFAIL, "failure tempfailed")

call(mt.disconnect(conn), "disconnect")
mt.echo("session script done")
