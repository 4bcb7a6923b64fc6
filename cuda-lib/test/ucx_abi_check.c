/* Compiles only where UCX's headers are installed: every declaration of src/ucx_abi.h must
 * match UCX's own (sizes, offsets, values, function types). Nothing runs. */
#include <assert.h>
#include <stddef.h>
#include <ucp/api/ucp.h>

#include "ucx_abi.h"

#define SAME_VALUE(ours, theirs) static_assert((long)(ours) == (long)(theirs), #ours " != " #theirs)
#define SAME_FIELD(ours, theirs, field) \
  static_assert(offsetof(ours, field) == offsetof(theirs, field), #ours "." #field " offset"); \
  static_assert(sizeof(((ours *)0)->field) == sizeof(((theirs *)0)->field), #ours "." #field " size")
#define SAME_SIZE(ours, theirs) static_assert(sizeof(ours) == sizeof(theirs), #ours " size")

SAME_SIZE(ux_status, ucs_status_t);
SAME_VALUE(UX_OK, UCS_OK);
SAME_VALUE(UX_INPROGRESS, UCS_INPROGRESS);
SAME_VALUE(UX_ERR_BUSY, UCS_ERR_BUSY);
SAME_VALUE(UX_ERR_CANCELED, UCS_ERR_CANCELED);
SAME_VALUE(UX_ERR_LAST, UCS_ERR_LAST);
SAME_VALUE(UX_PARAM_FIELD_FEATURES, UCP_PARAM_FIELD_FEATURES);
SAME_VALUE(UX_PARAM_FIELD_NAME, UCP_PARAM_FIELD_NAME);
SAME_VALUE(UX_FEATURE_WAKEUP, UCP_FEATURE_WAKEUP);
SAME_VALUE(UX_FEATURE_AM, UCP_FEATURE_AM);
SAME_VALUE(UX_WORKER_PARAM_FIELD_THREAD_MODE, UCP_WORKER_PARAM_FIELD_THREAD_MODE);
SAME_VALUE(UX_THREAD_MODE_SINGLE, UCS_THREAD_MODE_SINGLE);
SAME_VALUE(UX_LISTENER_PARAM_FIELD_SOCK_ADDR, UCP_LISTENER_PARAM_FIELD_SOCK_ADDR);
SAME_VALUE(UX_LISTENER_PARAM_FIELD_CONN_HANDLER, UCP_LISTENER_PARAM_FIELD_CONN_HANDLER);
SAME_VALUE(UX_LISTENER_ATTR_FIELD_SOCKADDR, UCP_LISTENER_ATTR_FIELD_SOCKADDR);
SAME_VALUE(UX_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR, UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR);
SAME_VALUE(UX_EP_PARAM_FIELD_ERR_HANDLING_MODE, UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE);
SAME_VALUE(UX_EP_PARAM_FIELD_ERR_HANDLER, UCP_EP_PARAM_FIELD_ERR_HANDLER);
SAME_VALUE(UX_EP_PARAM_FIELD_SOCK_ADDR, UCP_EP_PARAM_FIELD_SOCK_ADDR);
SAME_VALUE(UX_EP_PARAM_FIELD_FLAGS, UCP_EP_PARAM_FIELD_FLAGS);
SAME_VALUE(UX_EP_PARAM_FIELD_CONN_REQUEST, UCP_EP_PARAM_FIELD_CONN_REQUEST);
SAME_VALUE(UX_EP_PARAMS_FLAGS_CLIENT_SERVER, UCP_EP_PARAMS_FLAGS_CLIENT_SERVER);
SAME_VALUE(UX_ERR_HANDLING_MODE_PEER, UCP_ERR_HANDLING_MODE_PEER);
SAME_VALUE(UX_EP_CLOSE_FLAG_FORCE, UCP_EP_CLOSE_FLAG_FORCE);
SAME_VALUE(UX_OP_ATTR_FIELD_CALLBACK, UCP_OP_ATTR_FIELD_CALLBACK);
SAME_VALUE(UX_OP_ATTR_FIELD_USER_DATA, UCP_OP_ATTR_FIELD_USER_DATA);
SAME_VALUE(UX_OP_ATTR_FIELD_FLAGS, UCP_OP_ATTR_FIELD_FLAGS);
SAME_VALUE(UX_OP_ATTR_FIELD_MEMORY_TYPE, UCP_OP_ATTR_FIELD_MEMORY_TYPE);
SAME_VALUE(UX_OP_ATTR_FLAG_NO_IMM_CMPL, UCP_OP_ATTR_FLAG_NO_IMM_CMPL);
SAME_VALUE(UX_MEMORY_TYPE_HOST, UCS_MEMORY_TYPE_HOST);
SAME_VALUE(UX_AM_HANDLER_PARAM_FIELD_ID, UCP_AM_HANDLER_PARAM_FIELD_ID);
SAME_VALUE(UX_AM_HANDLER_PARAM_FIELD_FLAGS, UCP_AM_HANDLER_PARAM_FIELD_FLAGS);
SAME_VALUE(UX_AM_HANDLER_PARAM_FIELD_CB, UCP_AM_HANDLER_PARAM_FIELD_CB);
SAME_VALUE(UX_AM_HANDLER_PARAM_FIELD_ARG, UCP_AM_HANDLER_PARAM_FIELD_ARG);
SAME_VALUE(UX_AM_FLAG_WHOLE_MSG, UCP_AM_FLAG_WHOLE_MSG);
SAME_VALUE(UX_AM_SEND_FLAG_REPLY, UCP_AM_SEND_FLAG_REPLY);
SAME_VALUE(UX_AM_RECV_ATTR_FIELD_REPLY_EP, UCP_AM_RECV_ATTR_FIELD_REPLY_EP);
SAME_VALUE(UX_AM_RECV_ATTR_FLAG_DATA, UCP_AM_RECV_ATTR_FLAG_DATA);
SAME_VALUE(UX_AM_RECV_ATTR_FLAG_RNDV, UCP_AM_RECV_ATTR_FLAG_RNDV);
SAME_VALUE(UX_API_MAJOR, UCP_API_MAJOR);
static_assert(UX_API_MINOR <= UCP_API_MINOR, "ucp API minor asked is newer than the headers");

SAME_SIZE(ux_sock_addr, ucs_sock_addr_t);
SAME_FIELD(ux_sock_addr, ucs_sock_addr_t, addr);
SAME_FIELD(ux_sock_addr, ucs_sock_addr_t, addrlen);
SAME_SIZE(ux_params, ucp_params_t);
SAME_FIELD(ux_params, ucp_params_t, field_mask);
SAME_FIELD(ux_params, ucp_params_t, features);
SAME_FIELD(ux_params, ucp_params_t, name);
SAME_FIELD(ux_worker_params, ucp_worker_params_t, field_mask);
SAME_FIELD(ux_worker_params, ucp_worker_params_t, thread_mode);
static_assert(sizeof(ucp_worker_params_t) <= 1024, "ucx.c's room for the worker params");
SAME_SIZE(ux_listener_params, ucp_listener_params_t);
SAME_FIELD(ux_listener_params, ucp_listener_params_t, sockaddr);
SAME_FIELD(ux_listener_params, ucp_listener_params_t, accept_handler);
SAME_FIELD(ux_listener_params, ucp_listener_params_t, conn_handler);
SAME_SIZE(ux_listener_attr, ucp_listener_attr_t);
SAME_FIELD(ux_listener_attr, ucp_listener_attr_t, sockaddr);
SAME_SIZE(ux_conn_request_attr, ucp_conn_request_attr_t);
SAME_FIELD(ux_conn_request_attr, ucp_conn_request_attr_t, client_address);
SAME_SIZE(ux_ep_params, ucp_ep_params_t);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, address);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, err_mode);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, err_handler);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, user_data);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, flags);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, sockaddr);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, conn_request);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, name);
SAME_FIELD(ux_ep_params, ucp_ep_params_t, local_sockaddr);
SAME_SIZE(ux_request_param, ucp_request_param_t);
SAME_FIELD(ux_request_param, ucp_request_param_t, op_attr_mask);
SAME_FIELD(ux_request_param, ucp_request_param_t, flags);
SAME_FIELD(ux_request_param, ucp_request_param_t, request);
SAME_FIELD(ux_request_param, ucp_request_param_t, cb);
SAME_FIELD(ux_request_param, ucp_request_param_t, datatype);
SAME_FIELD(ux_request_param, ucp_request_param_t, user_data);
SAME_FIELD(ux_request_param, ucp_request_param_t, memory_type);
SAME_FIELD(ux_request_param, ucp_request_param_t, recv_info);
SAME_FIELD(ux_request_param, ucp_request_param_t, memh);
SAME_SIZE(ux_am_recv_param, ucp_am_recv_param_t);
SAME_FIELD(ux_am_recv_param, ucp_am_recv_param_t, recv_attr);
SAME_FIELD(ux_am_recv_param, ucp_am_recv_param_t, reply_ep);
SAME_SIZE(ux_am_handler_param, ucp_am_handler_param_t);
SAME_FIELD(ux_am_handler_param, ucp_am_handler_param_t, id);
SAME_FIELD(ux_am_handler_param, ucp_am_handler_param_t, flags);
SAME_FIELD(ux_am_handler_param, ucp_am_handler_param_t, cb);
SAME_FIELD(ux_am_handler_param, ucp_am_handler_param_t, arg);

/* Return types: ucs_status_t is one byte, so a slot declared to return int would read garbage. */
#define RETURNS(call, type) static_assert(__builtin_types_compatible_p(__typeof__(call), type), #call)
RETURNS(ucp_config_read(0, 0, 0), ucs_status_t);
RETURNS(ucp_config_modify(0, 0, 0), ucs_status_t);
RETURNS(ucp_init_version(0, 0, 0, 0, 0), ucs_status_t);
RETURNS(ucp_worker_create(0, 0, 0), ucs_status_t);
RETURNS(ucp_worker_progress(0), unsigned);
RETURNS(ucp_worker_get_efd(0, 0), ucs_status_t);
RETURNS(ucp_worker_arm(0), ucs_status_t);
RETURNS(ucp_worker_signal(0), ucs_status_t);
RETURNS(ucp_worker_set_am_recv_handler(0, 0), ucs_status_t);
RETURNS(ucp_listener_create(0, 0, 0), ucs_status_t);
RETURNS(ucp_listener_query(0, 0), ucs_status_t);
RETURNS(ucp_listener_reject(0, 0), ucs_status_t);
RETURNS(ucp_conn_request_query(0, 0), ucs_status_t);
RETURNS(ucp_ep_create(0, 0, 0), ucs_status_t);
RETURNS(ucp_ep_close_nbx(0, 0), ucs_status_ptr_t);
RETURNS(ucp_am_send_nbx(0, 0, 0, 0, 0, 0, 0), ucs_status_ptr_t);
RETURNS(ucp_am_recv_data_nbx(0, 0, 0, 0, 0), ucs_status_ptr_t);
RETURNS(ucp_request_check_status(0), ucs_status_t);
RETURNS(ucs_status_string(0), const char *);
