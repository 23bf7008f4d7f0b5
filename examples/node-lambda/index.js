// An AWS Lambda-style Node.js handler: (event, context), async.
exports.handler = async (event, context) => {
  return {
    statusCode: 200,
    body: `hello ${event && event.name ? event.name : 'world'} from ${context.functionName}`,
    requestId: context.awsRequestId,
    remainingMs: context.getRemainingTimeInMillis(),
  };
};
