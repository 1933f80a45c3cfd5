-- Review-conv2 F1: a conversation whose first inputs turned the web off
-- (PostgreSQL 0031 says more).
ALTER TABLE conversation_features ADD COLUMN web_off INTEGER NOT NULL DEFAULT 0;
