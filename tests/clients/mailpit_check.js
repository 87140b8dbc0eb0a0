// Drives smtpproxy's mailbox with the published mailpit-api client, unchanged.
// Usage: node mailpit_check.js BASE_URL [USER PASSWORD]
// Prints one JSON object with what each call returned; the trial test
// (tests/providers/mailbox/test_twistd_mailbox.py) checks it.
"use strict";

const { MailpitClient } = require("mailpit-api");

async function main() {
  const [base, username, password] = process.argv.slice(2);
  const options = username ? { auth: { username, password } } : undefined;
  const mailpit = new MailpitClient(base, options);
  const out = {};
  out.info = await mailpit.getInfo();
  out.list = await mailpit.listMessages();
  out.page = await mailpit.listMessages(1, 1);
  out.latest = await mailpit.getMessageSummary();
  const withAttachment = out.list.messages.find((m) => m.Attachments > 0);
  out.summary = await mailpit.getMessageSummary(withAttachment.ID);
  out.headers = await mailpit.getMessageHeaders(withAttachment.ID);
  out.source = await mailpit.getMessageSource(withAttachment.ID);
  const part = out.summary.Attachments[0];
  const blob = await mailpit.getMessageAttachment(withAttachment.ID, part.PartID);
  out.attachment = { type: blob.type, base64: Buffer.from(await blob.arrayBuffer()).toString("base64") };
  out.search = await mailpit.searchMessages({ query: "subject:invoice" });
  out.waited = await mailpit.waitForMessage({ query: "to:carol@example.net" }, { timeout: 5000, interval: 100 });
  out.html = await mailpit.renderMessageHTML(withAttachment.ID);
  out.text = await mailpit.renderMessageText(withAttachment.ID);
  out.chaos = await mailpit.setChaosTriggers({ Recipient: { ErrorCode: 451, Probability: 0 } });
  out.chaosRead = await mailpit.getChaosTriggers();
  out.config = await mailpit.getConfiguration();
  out.readStatus = await mailpit.setReadStatus({ IDs: [withAttachment.ID], Read: false });
  out.deleteOne = await mailpit.deleteMessages({ IDs: [withAttachment.ID] });
  out.afterDeleteOne = await mailpit.listMessages();
  out.deleteSearch = await mailpit.deleteMessagesBySearch({ query: "subject:invoice" });
  out.afterDeleteSearch = await mailpit.listMessages();
  out.deleteAll = await mailpit.deleteMessages();
  out.empty = await mailpit.waitForMessages({ count: 0 }, { timeout: 2000, interval: 100 });
  try {
    await mailpit.getMessageSummary("no-such-id");
    out.missing = "found";
  } catch (error) {
    out.missing = String(error.message);
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
