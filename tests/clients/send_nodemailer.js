// Sends one message through the relay with nodemailer, as a Node.js
// application would: STARTTLS required, AUTH, a UTF-8 subject and one file
// attached.  tests/test_real_clients.py runs it; the settings arrive as one
// JSON object on stdin (so the password is never on the command line) and the
// outcome leaves as one JSON object on stdout.
//
// Install nodemailer first: npm ci --prefix tests/clients
"use strict";

const fs = require("fs");
const nodemailer = require("nodemailer");

async function main() {
  const job = JSON.parse(fs.readFileSync(0, "utf8"));
  const transport = nodemailer.createTransport({
    host: job.host,
    port: job.port,
    secure: false, // plain connect, then STARTTLS ...
    requireTLS: true, // ... and give up rather than send in clear
    auth: { user: job.user, pass: job.pass },
    tls: { rejectUnauthorized: false }, // the test relay's certificate is self-signed
    connectionTimeout: 10000,
    greetingTimeout: 10000,
    socketTimeout: 20000,
  });
  const info = await transport.sendMail({
    from: job.from,
    to: job.to,
    subject: job.subject,
    text: job.text,
    attachments: [{ filename: job.filename, path: job.attachment }],
  });
  transport.close();
  process.stdout.write(
    JSON.stringify({ accepted: info.accepted, rejected: info.rejected, response: info.response }) +
      "\n",
  );
}

main().catch((error) => {
  process.stderr.write(`nodemailer: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
