-- create_all's DDL of tunewatch's schema as released at commit 00469d3 (sqlite).
CREATE TABLE controller_state (
	name VARCHAR(64) NOT NULL, 
	updated_at DATETIME NOT NULL, 
	state JSON NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE drift_checks (
	id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	adapter VARCHAR(128) NOT NULL, 
	share FLOAT, 
	detected BOOLEAN, 
	reason TEXT NOT NULL, 
	columns JSON NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_drift_checks_adapter ON drift_checks (adapter);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	kind VARCHAR(64) NOT NULL, 
	subject VARCHAR(128), 
	reason TEXT NOT NULL, 
	data JSON NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_events_created_at ON events (created_at);
CREATE INDEX ix_events_kind ON events (kind);
CREATE TABLE exchanges (
	id VARCHAR(32) NOT NULL, 
	created_at DATETIME NOT NULL, 
	route VARCHAR(16) NOT NULL, 
	adapter VARCHAR(128) NOT NULL, 
	parent_id VARCHAR(32), 
	endpoint VARCHAR(32) NOT NULL, 
	user VARCHAR(256), 
	prompt TEXT NOT NULL, 
	request JSON NOT NULL, 
	response TEXT, 
	prompt_tokens INTEGER, 
	completion_tokens INTEGER, 
	ttft_seconds FLOAT, 
	latency_seconds FLOAT NOT NULL, 
	mean_logprob FLOAT, 
	finish_reason VARCHAR(32), 
	status VARCHAR(16) NOT NULL, 
	http_status INTEGER NOT NULL, 
	error TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(parent_id) REFERENCES exchanges (id)
);
CREATE INDEX ix_exchanges_adapter ON exchanges (adapter);
CREATE INDEX ix_exchanges_created_at ON exchanges (created_at);
CREATE INDEX ix_exchanges_parent_id ON exchanges (parent_id);
CREATE TABLE leases (
	name VARCHAR(64) NOT NULL, 
	holder VARCHAR(128) NOT NULL, 
	expires_at DATETIME NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE rollout_commands (
	id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	command VARCHAR(16) NOT NULL, 
	adapter VARCHAR(128), 
	"by" VARCHAR(64) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	result TEXT, 
	rollout_id INTEGER, 
	PRIMARY KEY (id)
);
CREATE TABLE rollouts (
	id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	candidate VARCHAR(128) NOT NULL, 
	baseline VARCHAR(128), 
	stage VARCHAR(16) NOT NULL, 
	step INTEGER NOT NULL, 
	stage_started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	reason TEXT NOT NULL, 
	state JSON NOT NULL, 
	config JSON NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_rollouts_candidate ON rollouts (candidate);
CREATE INDEX ix_rollouts_stage ON rollouts (stage);
CREATE TABLE routing (
	id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	"table" JSON NOT NULL, 
	reason TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE training_jobs (
	id INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	status VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	parent_adapter VARCHAR(128), 
	adapter VARCHAR(128), 
	spec JSON NOT NULL, 
	progress JSON NOT NULL, 
	result JSON NOT NULL, 
	error TEXT, 
	pid INTEGER, 
	PRIMARY KEY (id)
);
CREATE TABLE adapters (
	name VARCHAR(128) NOT NULL, 
	path TEXT NOT NULL, 
	fingerprint VARCHAR(64) NOT NULL, 
	created_at DATETIME NOT NULL, 
	loaded BOOLEAN NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	parent VARCHAR(128), 
	job_id INTEGER, 
	hyperparameters JSON NOT NULL, 
	metrics JSON NOT NULL, 
	data JSON NOT NULL, 
	PRIMARY KEY (name), 
	FOREIGN KEY(job_id) REFERENCES training_jobs (id)
);
CREATE TABLE feedback (
	id INTEGER NOT NULL, 
	exchange_id VARCHAR(32) NOT NULL, 
	created_at DATETIME NOT NULL, 
	reference TEXT, 
	rating FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(exchange_id) REFERENCES exchanges (id)
);
CREATE INDEX ix_feedback_exchange_id ON feedback (exchange_id);
