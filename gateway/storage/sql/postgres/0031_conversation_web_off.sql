-- Review-conv2 F1: a conversation whose first inputs turned the web off (the
-- `disable` rewrite's value at `web_search.disable_path`, written by the
-- gateway or sent by the client). Dify answers every later message of it with
-- those inputs, so it never searches; any other conversation may fall back to
-- the web, and the `disable` rewrite of a later message cannot stop it: once
-- the allowance is spent, those are refused (gateway/conversations.py).
ALTER TABLE conversation_features ADD COLUMN web_off BOOLEAN NOT NULL DEFAULT false;
