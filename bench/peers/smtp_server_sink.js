// nodemailer's smtp-server accepting every message and keeping none of it.
//
// smtp-server is the SMTP engine of the best-known SMTP-to-Graph relay.  The
// onData hook drains the message stream and answers 250.  Two settings are
// changed from the defaults, both as an operator of a relay would: AUTH is
// optional (the other servers here run without it) and the reverse DNS
// lookup of every client is off (there is no DNS on this machine, and the
// other servers do not look names up either).
//
// Run: node bench/peers/smtp_server_sink.js PORT   (NODE_PATH=bench/.node/node_modules)
"use strict";

const { SMTPServer } = require("smtp-server");

const port = Number(process.argv[2]);
const server = new SMTPServer({
  name: "bench.test",
  authOptional: true,
  disabledCommands: ["AUTH"],
  disableReverseLookup: true,
  size: 64 * 1024 * 1024,
  logger: false,
  onData(stream, session, callback) {
    stream.on("data", () => {});
    stream.on("end", () => callback(null, "OK"));
  },
});
server.on("error", (err) => {
  console.error("smtp-server:", err.message);
});
server.listen(port, "127.0.0.1", 1024);
