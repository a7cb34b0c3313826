/*
 * localcloud_route: the two things AWS IoT Core does that plain MQTT cannot.
 *
 * 1. Requests with the caller's identity. When a device publishes a fleet-provisioning request
 *    ($aws/certificates/... or $aws/provisioning-templates/...), a copy goes to the local cloud's
 *    service client on "$localcloud/req/<original topic>", carrying the sender's client id and
 *    certificate CN as MQTT 5 user properties. The service learns who asked from the broker, not
 *    from anything the device could forge.
 * 2. Replies to that caller only. AWS delivers a provisioning response (which holds a certificate
 *    and an ownership token) to the requesting connection alone, although every device
 *    subscribes to the same topic. The service publishes "<client id>\n<topic>\n<payload>" to
 *    "$localcloud/deliver"; this plugin delivers <payload> on <topic> to that client only, and
 *    drops the control message.
 *
 * 3. Client IDs bound to identities (AWS's iot:Connect policy). The file named by the
 *    `connect_rules` option holds "<certificate CN> <client id or *>" lines, regenerated with the
 *    ACL file and re-read on reload. A connection whose client id breaks its rule is denied every
 *    publish and every delivery. (AWS refuses such a connection outright; mosquitto 2.0 offers no
 *    connect-time hook for certificate identities, so this is the closest faithful behaviour.)
 *
 * Everything else is left to the ACL file (MOSQ_ERR_PLUGIN_DEFER).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <mqtt_protocol.h>

#define DELIVER_TOPIC "$localcloud/deliver"
#define REQ_PREFIX "$localcloud/req/"
#define MAX_TOPIC 512

static mosquitto_plugin_id_t *plugin_id = NULL;
static char service_user[256] = "localcloud-service";
static char service_client[256] = "localcloud-service";

#define MAX_RULES 100000
static char connect_rules_path[1024] = "";
static char **rule_user = NULL;
static char **rule_client = NULL;
static int rule_count = 0;

static void free_rules(void)
{
	for(int i = 0; i < rule_count; i++){
		free(rule_user[i]);
		free(rule_client[i]);
	}
	free(rule_user);
	free(rule_client);
	rule_user = rule_client = NULL;
	rule_count = 0;
}

static void load_rules(void)
{
	FILE *f;
	char line[1024], user[512], client[512];
	int cap = 0;

	free_rules();
	if(!connect_rules_path[0]) return;
	f = fopen(connect_rules_path, "r");
	if(!f) return;
	while(fgets(line, sizeof(line), f) && rule_count < MAX_RULES){
		if(sscanf(line, "%511s %511s", user, client) != 2) continue;
		if(rule_count == cap){
			cap = cap ? cap * 2 : 64;
			rule_user = realloc(rule_user, sizeof(char *) * (size_t)cap);
			rule_client = realloc(rule_client, sizeof(char *) * (size_t)cap);
		}
		rule_user[rule_count] = strdup(user);
		rule_client[rule_count] = strdup(client);
		rule_count++;
	}
	fclose(f);
}

/* 1: the client id is allowed for this identity (or no rule applies); 0: it breaks its rule. */
static int client_id_allowed(struct mosquitto *client)
{
	const char *user = mosquitto_client_username(client);
	const char *id = mosquitto_client_id(client);
	if(!user || !id) return 1;
	for(int i = 0; i < rule_count; i++){
		if(strcmp(rule_user[i], user) == 0){
			return strcmp(rule_client[i], "*") == 0 || strcmp(rule_client[i], id) == 0;
		}
	}
	return 1;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	load_rules();
	return MOSQ_ERR_SUCCESS;
}

static int starts_with(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int is_provisioning_topic(const char *topic)
{
	return starts_with(topic, "$aws/certificates/") || starts_with(topic, "$aws/provisioning-templates/");
}

static int from_service(struct mosquitto *client)
{
	const char *user = mosquitto_client_username(client);
	return user && strcmp(user, service_user) == 0;
}

static int forward_request(struct mosquitto_evt_acl_check *ed)
{
	char topic[MAX_TOPIC];
	mosquitto_property *props = NULL;
	const char *id = mosquitto_client_id(ed->client);
	const char *user = mosquitto_client_username(ed->client);

	if(snprintf(topic, sizeof(topic), "%s%s", REQ_PREFIX, ed->topic) >= (int)sizeof(topic)){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, "client-id", id ? id : "")
			|| mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, "username", user ? user : "")){
		mosquitto_property_free_all(&props);
		return MOSQ_ERR_ACL_DENIED;
	}
	mosquitto_broker_publish_copy(service_client, topic, (int)ed->payloadlen, ed->payload, 1, false, props);
	return MOSQ_ERR_PLUGIN_DEFER; /* the original is still subject to the ACL file */
}

static int deliver(struct mosquitto_evt_acl_check *ed)
{
	const char *p = ed->payload;
	const char *end = p + ed->payloadlen;
	const char *nl1, *nl2;
	char client[256], topic[MAX_TOPIC];
	size_t n;

	if(!p) return MOSQ_ERR_ACL_DENIED;
	nl1 = memchr(p, '\n', (size_t)(end - p));
	if(!nl1) return MOSQ_ERR_ACL_DENIED;
	nl2 = memchr(nl1 + 1, '\n', (size_t)(end - nl1 - 1));
	if(!nl2) return MOSQ_ERR_ACL_DENIED;
	n = (size_t)(nl1 - p);
	if(n == 0 || n >= sizeof(client)) return MOSQ_ERR_ACL_DENIED;
	memcpy(client, p, n);
	client[n] = '\0';
	n = (size_t)(nl2 - nl1 - 1);
	if(n == 0 || n >= sizeof(topic)) return MOSQ_ERR_ACL_DENIED;
	memcpy(topic, nl1 + 1, n);
	topic[n] = '\0';
	mosquitto_broker_publish_copy(client, topic, (int)(end - nl2 - 1), nl2 + 1, 1, false, NULL);
	/* The control message itself goes nowhere. */
	return MOSQ_ERR_ACL_DENIED;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;
	(void)userdata;

	if(!ed->topic) return MOSQ_ERR_PLUGIN_DEFER;
	if(!from_service(ed->client) && !client_id_allowed(ed->client)) return MOSQ_ERR_ACL_DENIED;
	if(ed->access != MOSQ_ACL_WRITE) return MOSQ_ERR_PLUGIN_DEFER;
	if(from_service(ed->client)){
		if(strcmp(ed->topic, DELIVER_TOPIC) == 0) return deliver(ed);
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(starts_with(ed->topic, "$localcloud/")) return MOSQ_ERR_ACL_DENIED;
	if(is_provisioning_topic(ed->topic)) return forward_request(ed);
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	plugin_id = identifier;
	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "service_user")) snprintf(service_user, sizeof(service_user), "%s", opts[i].value);
		if(!strcmp(opts[i].key, "service_client")) snprintf(service_client, sizeof(service_client), "%s", opts[i].value);
		if(!strcmp(opts[i].key, "connect_rules")) snprintf(connect_rules_path, sizeof(connect_rules_path), "%s", opts[i].value);
	}
	load_rules();
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL)) return MOSQ_ERR_UNKNOWN;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	(void)opts;
	(void)opt_count;
	free_rules();
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
}
